"""Packed steps of our torch Llama on one CUDA device, from persistent device buffers.

Per step the host packs every int input into one pinned staging buffer and the mask into a
second, and each goes to the device in one non-blocking copy; the model reads views of the
persistent device buffers. Decode steps (one new token per sequence, logits for each) replay a
CUDA graph captured once per batch bucket: the graph holds the whole forward, the LM head, the
Medusa heads when loaded, and the K/V scatter into the pool. The logits stay in the graph's
output buffer (valid until the next replay), where the torch sampler reads them.

Invariants:
- the device buffers are sized for the largest step seen and grow (re-allocated) only when a
  larger step arrives; graphs are captured against the decode buffers, which never move;
- the host staging buffers are rewritten only after the previous step's copies from them
  completed: each upload records an event after its copies and the next waits on it (a step
  need not end with a device-to-host copy: logits stay on the device for the sampler);
- padded decode rows have context 0, slot -1 and read the null block: they write nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from apar_rt.core import StepInput

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class StepBuffers:
    """Pinned host staging + persistent device buffers for the step's int32 inputs and its mask."""

    FIELDS = ("input_ids", "positions", "context_lens", "query_start", "slot_mapping", "logits_indices")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = torch.empty(0, dtype=torch.int32)
        self.dev = torch.empty(0, dtype=torch.int32, device=device)
        self.host_mask = torch.empty(0, dtype=torch.bool)
        self.dev_mask = torch.empty(0, dtype=torch.bool, device=device)
        self.copied = CopyFence(device)

    def _fit(self, n_int: int, n_mask: int) -> None:
        if n_int > self.host.numel():
            n = max(n_int, 2 * self.host.numel())
            self.host = _pinned(n, torch.int32, self.device)
            self.dev = torch.empty(n, dtype=torch.int32, device=self.device)
        if n_mask > self.host_mask.numel():
            n = max(n_mask, 2 * self.host_mask.numel())
            self.host_mask = _pinned(n, torch.bool, self.device)
            self.dev_mask = torch.empty(n, dtype=torch.bool, device=self.device)

    def upload(self, step: StepInput) -> dict[str, torch.Tensor]:
        """Device views of the step's inputs (valid until the next upload)."""
        arrays = [getattr(step, f) for f in self.FIELDS] + [step.block_tables]
        sizes = [a.size for a in arrays]
        self.copied.wait()
        self._fit(sum(sizes), step.mask.size)
        host = self.host.numpy()
        views, off = {}, 0
        for name, a, n in zip((*self.FIELDS, "block_tables"), arrays, sizes):
            host[off:off + n] = a.reshape(-1)
            views[name] = (off, n, a.shape)
            off += n
        self.dev[:off].copy_(self.host[:off], non_blocking=True)
        nm = step.mask.size
        self.host_mask.numpy()[:nm] = step.mask.reshape(-1)
        self.dev_mask[:nm].copy_(self.host_mask[:nm], non_blocking=True)
        self.copied.record()
        out = {name: self.dev[o:o + n].view(shape) for name, (o, n, shape) in views.items()}
        out["mask"] = self.dev_mask[:nm].view(step.mask.shape)
        return out


class CopyFence:
    """An event after the last copies from a pinned staging buffer (nothing on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.event = None

    def record(self) -> None:
        if self.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.device))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _pinned(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Page-locked host memory for a CUDA device (plain memory otherwise, e.g. in CPU tests)."""
    t = torch.empty(n, dtype=dtype)
    return t.pin_memory() if device.type == "cuda" else t


def is_plain_decode(step: StepInput) -> bool:
    """One new token per sequence, each with its logits, no copy-on-write pending."""
    B = step.context_lens.shape[0]
    return (step.num_tokens == B and step.logits_indices.shape[0] == B and step.mask.shape[1] == 1
            and bool(step.mask.all()) and np.array_equal(step.logits_indices, np.arange(B)))


class DecodeGraphs:
    """CUDA graphs of the decode step, one per batch bucket, captured on first use."""

    def __init__(self, run_fn, device: torch.device, max_blocks: int, buckets=DECODE_BUCKETS) -> None:
        self.run_fn = run_fn          # (inputs dict) -> tuple of output tensors
        self.device = device
        self.max_blocks = max_blocks  # the static block-table width: covers the longest context
        self.buckets = buckets
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, tuple]] = {}
        self.pool = None
        self.host = torch.empty(0, dtype=torch.int32)
        self.copied = CopyFence(device)

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _static_inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        z = lambda *shape: torch.zeros(shape, dtype=torch.int32, device=self.device)  # noqa: E731
        return {"input_ids": z(bucket), "positions": z(bucket), "context_lens": z(bucket),
                "query_start": torch.arange(bucket + 1, dtype=torch.int32, device=self.device),
                "slot_mapping": torch.full((bucket,), -1, dtype=torch.int32, device=self.device),
                "logits_indices": torch.arange(bucket, dtype=torch.int32, device=self.device),
                "block_tables": z(bucket, self.max_blocks),
                "mask": torch.ones(bucket, 1, dtype=torch.bool, device=self.device)}

    def _capture(self, bucket: int):
        inputs = self._static_inputs(bucket)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.run_fn(inputs)                      # compiles the kernels and warms the allocator
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.run_fn(inputs)
        return graph, inputs, outputs

    def run(self, step: StepInput):
        """Outputs of the decode step (sliced to the real batch); None if it fits no bucket."""
        B = step.context_lens.shape[0]
        bucket = self.bucket(B)
        if bucket is None or step.block_tables.shape[1] > self.max_blocks:
            return None
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, inputs, outputs = self.graphs[bucket]
        # One pinned staging buffer -> one copy per field group (all non-blocking).
        W = self.max_blocks
        n = 4 * bucket + bucket * W
        self.copied.wait()
        if self.host.numel() < n:
            self.host = _pinned(n, torch.int32, self.device)
        h = self.host.numpy()[:n]
        h[:] = 0
        h[0:B] = step.input_ids
        h[bucket:bucket + B] = step.positions
        h[2 * bucket:2 * bucket + B] = step.context_lens
        h[3 * bucket:4 * bucket] = -1
        h[3 * bucket:3 * bucket + B] = step.slot_mapping
        tables = h[4 * bucket:].reshape(bucket, W)
        tables[:B, :step.block_tables.shape[1]] = step.block_tables
        src = self.host[:n]
        for i, name in enumerate(("input_ids", "positions", "context_lens", "slot_mapping")):
            inputs[name].copy_(src[i * bucket:(i + 1) * bucket], non_blocking=True)
        inputs["block_tables"].copy_(src[4 * bucket:].view(bucket, W), non_blocking=True)
        self.copied.record()
        graph.replay()
        return tuple(o[:B] if o is not None else None for o in outputs)
