"""Tiny random Llama checkpoints with a real tokenizer, written in HF format.

Used by the tests (as the oracle's and the engine's common input) and by the README's
main job until a trained demo model is present.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the a an of to and in is it that for on with as was at by this be from or are "
         "list item first second third next then also detail point note step tip plan idea "
         "water sleep food walk read write code test run build data model token tree fork "
         "one two three four five six seven eight nine ten . , : ; ! ? 1 2 3 4 5").split()


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(lines)]


def make_tokenizer(path: str | Path, vocab_size: int = 512, with_control_tokens: bool = True, seed: int = 0):
    """Train a byte-level BPE tokenizer and save it as a HF fast tokenizer in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"] + (["[SplitMask]", "[SplitSop]"] if with_control_tokens else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=special[3:])
    fast.save_pretrained(str(path))
    return fast


# the random Llama (hidden 512, 8 layers, 8 heads, vocabulary 32,000; weights N(0, 0.02)):
# `make_tiny_checkpoint(path, **RANDOM_LLAMA_512)`, as the quantization tests and
# samples/bench_vs_onnxruntime_genai.sh make it
RANDOM_LLAMA_512 = {"vocab_size": 32000, "hidden": 512, "layers": 8, "num_heads": 8, "num_kv_heads": 8,
                    "intermediate": 1536, "weight_std": 0.02}


def make_tiny_checkpoint(path: str | Path, *, seed: int = 0, num_kv_heads: int = 2, num_heads: int = 4,
                         hidden: int = 64, layers: int = 2, intermediate: int = 128,
                         with_control_tokens: bool = True, tie_word_embeddings: bool = False,
                         rope_scaling: dict | None = None, max_position_embeddings: int = 512,
                         safe_serialization: bool = True, max_shard_size: str | None = None,
                         weight_std: float = 0.2, vocab_size: int | None = None):
    """A random `LlamaForCausalLM` plus tokenizer in `path`; returns (model, tokenizer).

    vocab_size: the model's vocabulary (default: the tokenizer's; larger leaves ids the tokenizer never makes).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path, with_control_tokens=with_control_tokens, seed=seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than HF's init, so greedy paths are varied, not one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, weight_std)
    model.eval()
    kwargs = {"safe_serialization": safe_serialization}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)
    return model, tok
