"""The reference backend: our torch Llama on CPU or CUDA, K/V pools as torch tensors.

On CUDA a layer runs fused projections and Triton kernels (`cuda_model`), step inputs live in persistent device buffers
(`cuda_step.StepBuffers`), new K/V are scattered into the pool by a device kernel, and decode
steps replay CUDA graphs captured per batch bucket (`cuda_step.DecodeGraphs`). The engine's steps
(`execute`) keep the logits on the device: the torch sampler (`torch_sampler`) runs there and only
token ids (and Medusa's ranked top-k) come back.
"""

from __future__ import annotations

import numpy as np
import torch

from apar_rt.backends.base import Backend, BackendUnavailable
from apar_rt.backends.device import resolve_device
from apar_rt.backends.torch_sampler import DeviceSampler
from apar_rt.core import StepInput
from apar_rt.sampler import Sampled, SamplingBatch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_dir: str, *, dtype: str | None = "auto", device: str | None = None,
                 medusa_dir: str | None = None, cuda_graphs: bool = True) -> None:
        from apar_rt.model.weights import load_model

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev.type)
        if dev.type == "cuda":
            _check_gpu_support(model_dir, dt)
        model, config = load_model(model_dir, dtype=dt, device=dev)
        heads = None
        if medusa_dir is not None:
            from apar_rt.medusa.heads import load_heads
            heads = load_heads(medusa_dir, hidden=config.hidden_size, vocab=config.vocab_size, dtype=dt, device=dev)
        self._setup(model, config, dev, dt, heads, cuda_graphs)

    @classmethod
    def from_module(cls, model, config, *, device: torch.device, heads=None, cuda_graphs: bool = True):
        """A backend over a model already in memory (benchmarks build random 7B models this way)."""
        self = cls.__new__(cls)
        self._setup(model, config, torch.device(device), next(model.parameters()).dtype, heads, cuda_graphs)
        return self

    def _setup(self, model, config, device, dtype, heads, cuda_graphs) -> None:
        self.model, self.config, self.device, self.dtype, self.heads = model, config, device, dtype, heads
        self.num_medusa_heads = heads.num_heads if heads is not None else 0
        self.cuda = device.type == "cuda"
        self.use_cuda_graphs = cuda_graphs and self.cuda
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        # (new_k, new_v, the heads' input) of the last step (K/V: eager only). The Medusa heads run on the
        # rows drafting asks for (`medusa_logits_at`), not on every row of every step.
        self._last: tuple | None = None
        self._logits = None               # the last step's logits, on the device
        self._host = self._host_medusa = None   # their host copies, made on demand
        self._buffers = self._graphs = None
        self._host_logits = torch.empty(0)
        self._host_medusa_buf = torch.empty(0)
        self._sampler = DeviceSampler(device)
        if self.cuda:
            from apar_rt.backends.cuda_model import fuse_projections

            fuse_projections(model)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]
        if self.cuda:
            from apar_rt.backends.cuda_step import DecodeGraphs, StepBuffers

            self._buffers = StepBuffers(self.device)
            width = min(num_blocks, -(-c.max_position_embeddings // block_size))
            self._graphs = DecodeGraphs(self._run_graphed, self.device, width) if self.use_cuda_graphs else None

    def kv_bytes_per_block(self) -> int:
        c = self.config
        k = self.k_caches[0]
        return 2 * c.num_hidden_layers * k[0].numel() * k.element_size()

    # ---- one step --------------------------------------------------------------------------

    def _run(self, x: dict[str, torch.Tensor]):
        """Forward over device inputs; each layer writes its new K/V to x["slot_mapping"]."""
        from apar_rt.backends.cuda_model import fused_hidden_states

        h, new_k, new_v = fused_hidden_states(
            self.model, x["input_ids"], x["positions"], self.k_caches, self.v_caches, x["block_tables"],
            x["context_lens"], x["query_start"], x["mask"], x["slot_mapping"])
        h = h[x["logits_indices"].long()]
        logits = self.model.lm_head(h).float()
        return logits, (h if self.heads is not None else None), new_k, new_v

    def _run_graphed(self, x):
        logits, hidden, _, _ = self._run(x)
        return logits, hidden

    @torch.inference_mode()
    def execute(self, step: StepInput) -> None:
        """Run one step; its logits (and with Medusa heads, the hidden states they read) stay on
        the device (on CUDA, a decode step's stay in its graph's output buffers) for `sample`,
        `medusa_topk` and `step_logits`."""
        self._copy_blocks(step.block_copies)
        self._host = self._host_medusa = None
        if not self.cuda:
            self._logits, hidden, new_k, new_v = self._forward_cpu(step)
        else:
            out = self._graphs.run(step) if self._graphs is not None and _decode_only(step) else None
            if out is not None:
                (self._logits, hidden), new_k, new_v = out, None, None   # graphs serve plain decode: no commit_kv
            else:
                self._logits, hidden, new_k, new_v = self._run(self._buffers.upload(step))
        self._last = (new_k, new_v, hidden)

    def forward(self, step: StepInput) -> torch.Tensor:
        self.execute(step)
        return self.step_logits()

    def step_logits(self) -> torch.Tensor:
        """The last step's logits on the CPU: on CUDA one pinned copy, valid until the next step."""
        if self._host is None:
            self._host = self._logits if not self.cuda else self._to_host(self._logits, "_host_logits")
        return self._host

    def sample(self, rows, batch: SamplingBatch) -> Sampled:
        """The torch sampler where the logits are (`torch_sampler`): only ids, ok flags and the
        asked-for probes cross back, in one copy."""
        return self._sampler.sample(self._logits, rows, batch)

    def medusa_topk(self, rows, k: int, heads: int | None = None) -> np.ndarray:
        if self._hidden() is None:
            return super().medusa_topk(rows, k, heads)
        m = self.medusa_logits_at(rows)[:, :heads]
        R, H, V = m.shape
        return self._sampler.ranked_top_k(m.reshape(R * H, V), k).reshape(R, H, -1)

    def _hidden(self):
        """The last step's hidden states at its logits rows, when it has Medusa heads to feed."""
        return self._last[2] if self._last is not None else None

    @torch.inference_mode()
    def medusa_logits_at(self, rows) -> torch.Tensor:
        """The heads' logits [R, heads, vocab] at logits rows `rows` of the last step, on the device:
        the heads run on those rows only."""
        h = self._hidden()
        if h is None:
            return super().medusa_logits_at(rows)
        return self.heads(h.index_select(0, torch.as_tensor(np.asarray(rows, np.int64)).to(h.device))).float()

    def _to_host(self, t: torch.Tensor, attr: str) -> torch.Tensor:
        """One non-blocking copy into a pinned buffer (kept in `attr`), then wait. The returned
        tensor is valid until the next step."""
        n = t.numel()
        buf = getattr(self, attr)
        if buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32).pin_memory()
            setattr(self, attr, buf)
        host = buf[:n].view(t.shape)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def _copy_blocks(self, copies) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache[dst] = cache[src]

    def _forward_cpu(self, step: StepInput):
        t = torch.from_numpy
        rows = t(step.logits_indices).long()
        h, new_k, new_v = self.model.hidden_states(
            t(step.input_ids), t(step.positions), self.k_caches, self.v_caches, t(step.block_tables),
            t(step.context_lens), t(step.query_start), t(step.mask))
        h = h[rows]
        logits = self.model.lm_head(h).float()
        slots = t(step.slot_mapping).long()
        keep = slots >= 0
        self._write_cpu(new_k, new_v, keep.nonzero().squeeze(1), slots[keep])
        return logits, (h if self.heads is not None else None), new_k, new_v

    def _write_cpu(self, new_k, new_v, idx: torch.Tensor, slots: torch.Tensor) -> None:
        for kc, vc, k, v in zip(self.k_caches, self.v_caches, new_k, new_v):
            kc.view(-1, *kc.shape[2:])[slots] = k[idx]
            vc.view(-1, *vc.shape[2:])[slots] = v[idx]

    @torch.inference_mode()
    def medusa_logits(self) -> torch.Tensor:
        h = self._hidden()
        if h is None:
            return super().medusa_logits()
        if self._host_medusa is None:
            m = self.heads(h).float()
            self._host_medusa = m if not self.cuda else self._to_host(m, "_host_medusa_buf").clone()
        return self._host_medusa

    @torch.inference_mode()
    def commit_kv(self, token_indices, slots) -> None:
        new_k, new_v, _ = self._last
        if not self.cuda:
            self._write_cpu(new_k, new_v, torch.as_tensor(token_indices).long(), torch.as_tensor(slots).long())
            return
        from apar_rt.kernels.kv_cache import write_kv

        idx = torch.tensor(token_indices, dtype=torch.int32).pin_memory().to(self.device, non_blocking=True)
        dst = torch.tensor(slots, dtype=torch.int32).pin_memory().to(self.device, non_blocking=True)
        for kc, vc, k, v in zip(self.k_caches, self.v_caches, new_k, new_v):
            write_kv(k, v, kc, vc, dst, idx)


def _decode_only(step: StepInput) -> bool:
    from apar_rt.backends.cuda_step import is_plain_decode

    return not step.block_copies and is_plain_decode(step)


def _check_gpu_support(model_dir: str, dtype: torch.dtype) -> None:
    """Fail at load, naming what is missing, rather than at the first step."""
    from apar_rt.config import ModelConfig
    from apar_rt.ops.tree_attention import gpu_kernels

    kernels = gpu_kernels()
    cfg = ModelConfig.from_dir(model_dir)
    if cfg.head_dim not in kernels.SUPPORTED_HEAD_DIMS:
        raise BackendUnavailable(f"the CUDA attention kernel does not support head size {cfg.head_dim}; "
                                 f"supported: {', '.join(map(str, kernels.SUPPORTED_HEAD_DIMS))} "
                                 f"(use --device cpu for other sizes)")
    if dtype not in kernels.SUPPORTED_DTYPES:
        raise BackendUnavailable(f"the CUDA attention kernel does not support {dtype}; supported: "
                                 f"float16, bfloat16, float32")
