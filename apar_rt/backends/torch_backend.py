"""The reference backend: our torch Llama on CPU or GPU, K/V pools as torch tensors."""

from __future__ import annotations

import torch

from apar_rt.backends.base import Backend
from apar_rt.core import StepInput

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
                 medusa_dir: str | None = None) -> None:
        from apar_rt.model.weights import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        self.model, self.config = load_model(model_dir, dtype=self.dtype, device=self.device)
        self.heads = None
        if medusa_dir is not None:
            from apar_rt.medusa.heads import load_heads
            self.heads = load_heads(medusa_dir, hidden=self.config.hidden_size, vocab=self.config.vocab_size,
                                    dtype=self.dtype, device=self.device)
            self.num_medusa_heads = self.heads.num_heads
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self._last: tuple | None = None   # (new_k, new_v, medusa logits) of the last forward

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]

    def kv_bytes_per_block(self) -> int:
        c = self.config
        k = self.k_caches[0]
        return 2 * c.num_hidden_layers * k[0].numel() * k.element_size()

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        dev = self.device
        if step.block_copies:
            src = torch.tensor([s for s, _ in step.block_copies], device=dev)
            dst = torch.tensor([d for _, d in step.block_copies], device=dev)
            for cache in (*self.k_caches, *self.v_caches):
                cache[dst] = cache[src]
        t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
        rows = t(step.logits_indices).long()
        h, new_k, new_v = self.model.hidden_states(
            t(step.input_ids), t(step.positions), self.k_caches, self.v_caches, t(step.block_tables),
            t(step.context_lens), t(step.query_start), t(step.mask))
        h = h[rows]
        logits = self.model.lm_head(h).float()
        medusa = self.heads(h).cpu() if self.heads is not None else None
        self._last = (new_k, new_v, medusa)
        slots = t(step.slot_mapping).long()
        keep = slots >= 0
        self._write(new_k, new_v, keep.nonzero().squeeze(1), slots[keep])
        return logits.cpu()

    def _write(self, new_k, new_v, idx: torch.Tensor, slots: torch.Tensor) -> None:
        for kc, vc, k, v in zip(self.k_caches, self.v_caches, new_k, new_v):
            kc.view(-1, *kc.shape[2:])[slots] = k[idx]
            vc.view(-1, *vc.shape[2:])[slots] = v[idx]

    def medusa_logits(self) -> torch.Tensor:
        if self._last is None or self._last[2] is None:
            return super().medusa_logits()
        return self._last[2]

    @torch.inference_mode()
    def commit_kv(self, token_indices, slots) -> None:
        new_k, new_v, _ = self._last
        dev = self.device
        self._write(new_k, new_v, torch.as_tensor(token_indices, device=dev).long(),
                    torch.as_tensor(slots, device=dev).long())
