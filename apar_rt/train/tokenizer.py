"""Train a small byte-level BPE tokenizer and save it as a HF tokenizer folder.

Layout of the vocabulary (Llama-like ids for the specials):

- 0 ``<unk>`` (also the pad token), 1 ``<s>`` (BOS), 2 ``</s>`` (EOS);
- then the 256 byte symbols and the learned merges;
- last, with ``control_tokens=True``: ``[SplitMask]`` ([Fork]) and ``[SplitSop]``
  ([Child]) as special added tokens, ids ``V-2`` and ``V-1`` (as in THUDM/APAR, where
  they follow the base vocabulary). ``decode(..., skip_special_tokens=True)`` drops them.

Encoding a text adds BOS in front (``tokenizer(text).input_ids[0] == 1``), like Llama.
The folder loads with ``transformers.AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from apar_rt.apar import CHILD_TOKEN, FORK_TOKEN

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None = None,
    *,
    vocab_size: int = 1024,
    control_tokens: bool = True,
    model_max_length: int = 1024,
):
    """Train a byte-level BPE tokenizer on `texts`.

    Args:
        texts: training texts (without control tokens).
        out_dir: when given, the HF tokenizer folder is written there.
        vocab_size: size of the BPE vocabulary, specials included, control tokens excluded.
        control_tokens: add ``[SplitMask]`` and ``[SplitSop]`` at the end of the vocabulary.
        model_max_length: recorded in the tokenizer config.

    Returns:
        A ``transformers`` fast tokenizer.

    Raises:
        ValueError: `vocab_size` is too small to hold the byte alphabet and specials.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 3}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    extra = []
    if control_tokens:
        extra = [FORK_TOKEN, CHILD_TOKEN]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    kwargs = dict(bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=UNK, model_max_length=model_max_length)
    if extra:
        kwargs["additional_special_tokens"] = extra
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf
