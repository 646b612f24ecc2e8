"""Split a packed step into runs that fit fixed-shape profiles: decode sequences together, prefills in groups.

A TensorRT plan has a decode profile per batch bucket (each sequence brings at most
`max_decode_q` new tokens) and prefill profiles only for small batches, so that no profile is
sized for long prefills at a large batch (the attention function's padded scores grow with
batch x longest prefill). A mixed step becomes one decode run plus prefill runs of at most
`max_prefill_batch` sequences. Sequences attend only to their own tokens and cached context,
so the runs are independent; the caller writes the new K/V after all of them. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apar_rt.core import StepInput


@dataclass(slots=True)
class SubStep:
    """One run of a split step."""

    kind: str                  # "decode" or "prefill"
    step: StepInput            # its own packed step (block_copies only on the first run)
    tokens: np.ndarray         # [T_sub] int64: its tokens' indices in the full step
    logits_rows: np.ndarray    # [N_sub] int64: the full step's logits rows its logits fill, in order


def _sub(step: StepInput, seqs: list[int], kind: str, copies: list) -> SubStep:
    qs = step.query_start
    tokens = np.concatenate([np.arange(qs[b], qs[b + 1]) for b in seqs]).astype(np.int64) if seqs else \
        np.zeros(0, np.int64)
    q = np.array([qs[b + 1] - qs[b] for b in seqs], np.int32)
    inv = np.full(step.num_tokens, -1, np.int64)
    inv[tokens] = np.arange(tokens.shape[0])
    li = step.logits_indices.astype(np.int64)
    rows = np.flatnonzero(inv[li] >= 0)
    max_q = max(1, int(q.max()) if q.size else 1)
    sub = StepInput(
        input_ids=step.input_ids[tokens], positions=step.positions[tokens],
        block_tables=step.block_tables[seqs], context_lens=step.context_lens[seqs],
        query_start=np.concatenate([[0], np.cumsum(q)]).astype(np.int32),
        mask=np.ascontiguousarray(step.mask[tokens, :max_q]), slot_mapping=step.slot_mapping[tokens],
        logits_indices=inv[li[rows]].astype(np.int32), block_copies=list(copies))
    return SubStep(kind, sub, tokens, rows.astype(np.int64))


def split_step(step: StepInput, max_decode_q: int, max_prefill_batch: int) -> list[SubStep]:
    """The runs of `step`: one decode run (when any sequence has <= max_decode_q new tokens) and
    prefill runs of at most `max_prefill_batch` sequences each, in sequence order."""
    qs = step.query_start
    B = int(step.block_tables.shape[0])
    q = qs[1:] - qs[:-1]
    prefill = [b for b in range(B) if q[b] > max_decode_q]
    if not prefill:
        T = step.num_tokens
        return [SubStep("decode", step, np.arange(T, dtype=np.int64),
                        np.arange(step.logits_indices.shape[0], dtype=np.int64))]
    decode = [b for b in range(B) if q[b] <= max_decode_q]
    groups = [("decode", decode)] if decode else []
    groups += [("prefill", prefill[i:i + max_prefill_batch]) for i in range(0, len(prefill), max_prefill_batch)]
    return [_sub(step, seqs, kind, step.block_copies if i == 0 else []) for i, (kind, seqs) in enumerate(groups)]


__all__ = ["SubStep", "split_step"]
