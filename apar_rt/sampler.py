"""Token selection from a step's logits, per request: bias, bans, greedy or temperature/top-k/top-p."""

from __future__ import annotations

from typing import Sequence

import torch

from apar_rt.core import SamplingParams


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
    """One token from processed logits [V]."""
    if params.greedy:
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
    return int(torch.multinomial(probs, 1, generator=generator))
