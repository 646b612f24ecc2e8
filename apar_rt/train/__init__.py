"""Training-side tools for APAR: data formatting, a synthetic demo corpus,
a small tokenizer builder and a fine-tuning loop for HF Llama checkpoints."""
