"""The exported step graph's interface: tensor names, axes, and a StepInput as feeds.

Both built backends (onnxruntime, tensorrt) and the exporter use these names, so they are
defined once. Inputs are the packed step of `apar_rt.core.StepInput` (indices int32) plus the
per-layer KV pools; outputs are the logits (float32), the Medusa heads' logits when the graph
has heads, and the per-layer new K/V.

Fixed-batch buckets: a step of B sequences runs in the smallest bucket >= B; the extra
sequences own no tokens, have context length 0, and their block tables hold only the null
block 0, so no real token sees them and the op never reads past block 0 for them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

STEP_INPUTS = ("input_ids", "positions", "block_tables", "context_lens", "query_start", "mask",
               "logits_indices")
# Symbolic axis names of every step input (the KV pools add "num_blocks").
STEP_AXES = {
    "input_ids": ("num_tokens",),
    "positions": ("num_tokens",),
    "block_tables": ("batch", "max_blocks"),
    "context_lens": ("batch",),
    "query_start": ("batch_plus_1",),
    "mask": ("num_tokens", "max_q"),
    "logits_indices": ("num_logits",),
}


def k_cache_name(layer: int) -> str:
    return f"k_cache_{layer}"


def v_cache_name(layer: int) -> str:
    return f"v_cache_{layer}"


def new_k_name(layer: int) -> str:
    return f"new_k_{layer}"


def new_v_name(layer: int) -> str:
    return f"new_v_{layer}"


def input_names(num_layers: int) -> list[str]:
    names = list(STEP_INPUTS)
    for i in range(num_layers):
        names += [k_cache_name(i), v_cache_name(i)]
    return names


MEDUSA_LOGITS = "medusa_logits"   # [num_logits, heads, vocab] float32, when the graph has Medusa heads


def output_names(num_layers: int, medusa: bool = False) -> list[str]:
    names = ["logits"] + ([MEDUSA_LOGITS] if medusa else [])
    for i in range(num_layers):
        names += [new_k_name(i), new_v_name(i)]
    return names


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {name: dict(enumerate(dims)) for name, dims in STEP_AXES.items()}
    for i in range(num_layers):
        axes[k_cache_name(i)] = axes[v_cache_name(i)] = {0: "num_blocks"}
        axes[new_k_name(i)] = axes[new_v_name(i)] = {0: "num_tokens"}
    axes["logits"] = axes[MEDUSA_LOGITS] = {0: "num_logits"}
    return axes


def pick_bucket(batch: int, buckets) -> int:
    """The smallest bucket >= batch; RuntimeError when none fits (the scheduler's budget is wrong)."""
    buckets = sorted(buckets)
    i = bisect.bisect_left(buckets, batch)
    if i == len(buckets):
        raise RuntimeError(f"a step of {batch} sequences exceeds the engine's largest batch bucket "
                           f"{buckets[-1]}; max_num_seqs must not exceed the engine's max batch size")
    return buckets[i]


@dataclass(slots=True)
class StepFeeds:
    """The step inputs of one run as contiguous int32/bool arrays, batch padded to `batch`."""

    arrays: dict[str, np.ndarray]
    batch: int            # padded batch (the bucket)
    num_tokens: int
    num_logits: int       # real logits rows; arrays["logits_indices"] may hold padding after them


def step_feeds(step, bucket: int | None = None, min_logits: int = 0) -> StepFeeds:
    """Feeds for a StepInput, the batch padded to `bucket` with null-block sequences.

    `min_logits` pads logits_indices (with index 0) for runtimes that cannot take an empty
    tensor; the caller drops the extra rows.
    """
    B = int(step.block_tables.shape[0])
    tables, ctx, qs = step.block_tables, step.context_lens, step.query_start
    if bucket is not None and bucket > B:
        pad = bucket - B
        tables = np.concatenate([tables, np.zeros((pad, tables.shape[1]), np.int32)], axis=0)
        ctx = np.concatenate([ctx, np.zeros(pad, np.int32)])
        qs = np.concatenate([qs, np.full(pad, qs[-1], np.int32)])
    n = int(step.logits_indices.shape[0])
    li = step.logits_indices
    if n < min_logits:
        li = np.concatenate([li, np.zeros(min_logits - n, np.int32)])
    c = np.ascontiguousarray
    arrays = {
        "input_ids": c(step.input_ids, np.int32), "positions": c(step.positions, np.int32),
        "block_tables": c(tables, np.int32), "context_lens": c(ctx, np.int32),
        "query_start": c(qs, np.int32), "mask": c(step.mask, np.bool_), "logits_indices": c(li, np.int32),
    }
    return StepFeeds(arrays, int(tables.shape[0]), int(step.input_ids.shape[0]), n)
