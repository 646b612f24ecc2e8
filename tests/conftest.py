"""Shared fixtures: tiny random HF checkpoints (the oracle's and the engine's common input)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU: Triton kernels run under its interpreter, on CPU tensors (read when kernels are defined).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    """A random Llama with GQA (4 query heads, 2 KV heads) and the APAR control tokens."""
    from apar_rt.testing.tiny_model import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_gqa")
    hf, tok = make_tiny_checkpoint(path, seed=0, num_kv_heads=2)
    return path, hf, tok


@pytest.fixture(scope="session")
def tiny_mha(tmp_path_factory):
    """A random Llama with MHA, tied embeddings, and no control tokens."""
    from apar_rt.testing.tiny_model import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_mha")
    hf, tok = make_tiny_checkpoint(path, seed=1, num_kv_heads=4, with_control_tokens=False,
                                   tie_word_embeddings=True)
    return path, hf, tok
