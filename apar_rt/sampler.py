"""Token selection from a step's logits, per request: bias, bans, greedy or temperature/top-k/top-p.

Logits rows are torch tensors or numpy arrays (the onnxruntime backend on the CPU runs without
torch). Greedy selection and the bias/bans work on either without importing torch; seeded or
temperature sampling imports torch when first used, so a sampled token is the same on every
backend for the same seed. (Keep this torch-free for greedy numpy rows: the fast start of an
engine folder, tests/test_fast_start.py, depends on it.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from apar_rt.core import SamplingParams

if TYPE_CHECKING:
    import torch


class SamplingError(ValueError):
    """A request's logits or sampling parameters give no valid distribution (its message is
    safe to show the client). The engine fails that request alone."""


def make_generator(seed: int | None) -> "torch.Generator | None":
    if seed is None:
        return None
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def process_logits(row, params: SamplingParams, banned: Sequence[int]):
    """Logit bias, then bans. `row` is [V] float32 (torch or numpy) and is not modified."""
    row = row.copy() if isinstance(row, np.ndarray) else row.clone()
    vocab = row.shape[0]
    for tok, val in params.logit_bias:
        if 0 <= tok < vocab:
            row[tok] += val
    if banned:
        row[list(banned)] = float("-inf")
    return row


def sample_row(row, params: SamplingParams, generator: "torch.Generator | None") -> int:
    """One token from processed logits [V] (torch or numpy; the first maximum when greedy);
    SamplingError if they give no valid distribution."""
    if params.greedy:
        top = row.max()
        if bool((row != row).any()) or not abs(float(top)) < float("inf"):
            raise SamplingError("the logits of this request are not finite; no token can be picked")
        return int(row.argmax())
    import torch

    if isinstance(row, np.ndarray):
        row = torch.from_numpy(row)
    row = row / params.temperature
    if params.top_k and params.top_k < row.shape[0]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = (cum - sorted_p) >= params.top_p      # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        raise SamplingError(f"sampling gave no valid distribution for this request (temperature="
                            f"{params.temperature:g}, top_p={params.top_p:g}, top_k={params.top_k}): "
                            "its probabilities are not finite")
    return int(torch.multinomial(probs, 1, generator=generator))
