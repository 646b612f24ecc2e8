"""Token selection from a step's logits, per request: bias, bans, greedy or temperature/top-k/top-p."""

from __future__ import annotations

from typing import Sequence

import torch

from apar_rt.core import SamplingParams


class SamplingError(ValueError):
    """A request's logits or sampling parameters give no valid distribution (its message is
    safe to show the client). The engine fails that request alone."""


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def process_logits(row: torch.Tensor, params: SamplingParams, banned: Sequence[int]) -> torch.Tensor:
    """Logit bias, then bans. `row` is [V] float32 and is not modified."""
    row = row.clone()
    vocab = row.shape[0]
    for tok, val in params.logit_bias:
        if 0 <= tok < vocab:
            row[tok] += val
    if banned:
        row[list(banned)] = float("-inf")
    return row


def sample_row(row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from processed logits [V]; SamplingError if they give no valid distribution."""
    if params.greedy:
        if torch.isnan(row).any() or not torch.isfinite(row.max()):
            raise SamplingError("the logits of this request are not finite; no token can be picked")
        return int(torch.argmax(row))
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
