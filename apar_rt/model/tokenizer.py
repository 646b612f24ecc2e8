"""Tokenizer loading, control-token discovery and prompt templating."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from apar_rt.apar import CHILD_TOKEN, FORK_TOKEN, ControlTokens
from apar_rt.config import ModelLoadError

VICUNA_V1_1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def vicuna_v1_1_prompt(user: str, system: str = VICUNA_V1_1_SYSTEM) -> str:
    """The Vicuna v1.1 conversation template, for one user turn awaiting the assistant."""
    return f"{system} USER: {user} ASSISTANT:"


def load_tokenizer(path: str | Path, only: Iterable[str] | None = None):
    """The folder's tokenizer. No code from the folder ever runs: a tokenizer that needs custom
    code (`auto_map`) is refused with ModelLoadError, never prompted for.

    only: read just these files of the folder (an engine folder's recorded files); the others
    are ignored.
    """
    if only is None:
        return _load_tokenizer(Path(path), Path(path))
    with tempfile.TemporaryDirectory(prefix="apar-tokenizer-") as tmp:
        for name in only:
            src = Path(path, name)
            if "/" not in name and "\\" not in name and src.is_file():
                os.symlink(src.resolve(), Path(tmp, name))
        return _load_tokenizer(Path(tmp), Path(path))


def _load_tokenizer(folder: Path, shown: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad folder
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ModelLoadError(f"the tokenizer of {str(shown)!r} needs custom code from the folder (auto_map); "
                                 "apar-rt never runs code from a model folder: use a built-in tokenizer class "
                                 "(tokenizer_class in tokenizer_config.json)") from None
        raise ModelLoadError(f"cannot load a tokenizer from {str(shown)!r}: {e}") from None


def control_tokens(tokenizer, fork_id: int | None = None, child_id: int | None = None) -> ControlTokens:
    """[Fork]/[Child] ids: given explicitly, else found by name in the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    fork = fork_id if fork_id is not None else vocab.get(FORK_TOKEN)
    child = child_id if child_id is not None else vocab.get(CHILD_TOKEN)
    if fork is None or child is None:
        return ControlTokens(None, None)
    return ControlTokens(fork, child)


def encode_prompt(tokenizer, prompt: str, *, raw: bool = False) -> list[int]:
    """Token ids for a user prompt: the checkpoint's chat template, else Vicuna v1.1; raw skips both."""
    if raw:
        return list(tokenizer(prompt).input_ids)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(vicuna_v1_1_prompt(prompt)).input_ids)
