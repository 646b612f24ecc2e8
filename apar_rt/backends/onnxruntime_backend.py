"""The `onnxruntime` backend: an engine folder's model.onnx in an InferenceSession.

The KV pools are torch tensors (CPU, or CUDA with the CUDA execution provider) bound to the
session by pointer through one IOBinding, so a step copies no pool: the session reads them
in place, the new K/V come back in preallocated output buffers, and the runtime writes them
into the pool at the step's slots. Steps are padded to the engine's batch buckets with
null-block sequences (see `apar_rt.export.step_io`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from apar_rt.backends.base import Backend, BackendUnavailable
from apar_rt.build.manifest import ONNX_NAME, verify_engine_dir
from apar_rt.core import StepInput
from apar_rt.export import step_io

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.bool: np.bool_}


def _check_dtype(requested: str | None, built: str) -> None:
    if requested not in (None, "auto", built):
        raise ValueError(f"dtype {requested!r} differs from the engine's dtype {built!r} (fixed at build time); "
                         f"pass --dtype auto or rebuild with --dtype {requested}")


def _device(requested: str | None) -> torch.device:
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if requested is None:
        return torch.device("cuda" if cuda_ep and torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not (cuda_ep and torch.cuda.is_available()):
        raise BackendUnavailable(f"device {requested!r} needs onnxruntime's CUDAExecutionProvider and a CUDA build "
                                 f"of torch; available providers: {', '.join(ort.get_available_providers())}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"the onnxruntime backend runs on cpu or cuda, not {requested!r}")
    return dev


class OnnxRuntimeBackend(Backend):
    """Runs `model.onnx` of an engine folder built by `apar-rt build`.

    Args:
        engine_dir: the engine folder (its manifest is verified, sha256 included).
        dtype: "auto" or the engine's dtype (anything else is a ValueError).
        device: "cpu", "cuda[:i]" or None (CUDA when onnxruntime and torch both have it).
        threads: intra-op threads (None: onnxruntime's default).
        check_hashes: verify the sha256 of every engine file on load.
        medusa_dir: given by the engine when Medusa is asked for; the heads are inside the graph, so
            this only checks that the engine was built with them.
    """

    name = "onnxruntime"

    def __init__(self, engine_dir: str, *, dtype: str | None = "auto", device: str | None = None,
                 threads: int | None = None, check_hashes: bool = True, medusa_dir: str | None = None) -> None:
        self.engine_dir = Path(engine_dir)
        self.manifest = m = verify_engine_dir(engine_dir, backend=self.name, check_hashes=check_hashes)
        if medusa_dir is not None and not m.medusa:
            raise BackendUnavailable(f"{str(engine_dir)!r} was built without Medusa heads; rebuild it from a "
                                     f"model folder that has a 'medusa' heads folder")
        self.num_medusa_heads = int(m.medusa.get("num_heads", 0))
        _check_dtype(dtype, m.dtype)
        if m.dtype not in ("float32", "float16"):
            raise BackendUnavailable(f"the onnxruntime backend runs float32 or float16 engines, not {m.dtype}")
        self.device = _device(device)
        self.dtype = _TORCH[m.dtype]
        cfg = m.model_config
        self.num_layers = int(cfg["num_hidden_layers"])
        self.num_kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = int(cfg["head_dim"])
        self.vocab_size = int(cfg["vocab_size"])
        self.buckets = sorted(m.batch_buckets)

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.engine_dir / m.onnx.get("file", ONNX_NAME)), so,
                                                providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendUnavailable(f"onnxruntime cannot load {self.engine_dir / ONNX_NAME}: {e}") from None
        want = step_io.input_names(self.num_layers)
        got = [i.name for i in self.session.get_inputs()]
        if got != want:
            raise BackendUnavailable(f"{self.engine_dir / ONNX_NAME} has inputs {got}, expected {want}")
        self._dev_type = "cuda" if self.device.type == "cuda" else "cpu"
        self._dev_id = (self.device.index or 0) if self.device.type == "cuda" else 0
        self._io = self.session.io_binding()
        self.block_size = m.block_size
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self._last: tuple | None = None   # (new_k, new_v) of the last forward, for commit_kv
        self._medusa: torch.Tensor | None = None  # the last forward's Medusa logits

    # ---- the pool ------------------------------------------------------------------------

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        if block_size != self.manifest.block_size:
            raise ValueError(f"block_size {block_size} differs from the engine's block size "
                             f"{self.manifest.block_size} (fixed at build time)")
        if self.manifest.max_num_blocks and num_blocks > self.manifest.max_num_blocks:
            raise ValueError(f"num_blocks {num_blocks} exceeds the engine's max_num_blocks "
                             f"{self.manifest.max_num_blocks}")
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for i, (k, v) in enumerate(zip(self.k_caches, self.v_caches)):
            self._bind_input(step_io.k_cache_name(i), k)
            self._bind_input(step_io.v_cache_name(i), v)

    def kv_bytes_per_block(self) -> int:
        k = self.k_caches[0]
        return 2 * self.num_layers * k[0].numel() * k.element_size()

    def _bind_input(self, name: str, t: torch.Tensor) -> None:
        self._io.bind_input(name, self._dev_type, self._dev_id, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())

    def _bind_output(self, name: str, t: torch.Tensor) -> None:
        self._io.bind_output(name, self._dev_type, self._dev_id, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        if not self.k_caches:
            raise RuntimeError("allocate_kv must be called before forward")
        dev = self.device
        if step.block_copies:
            src = torch.tensor([s for s, _ in step.block_copies], device=dev)
            dst = torch.tensor([d for _, d in step.block_copies], device=dev)
            for cache in (*self.k_caches, *self.v_caches):
                cache[dst] = cache[src]
        bucket = step_io.pick_bucket(int(step.block_tables.shape[0]), self.buckets) if self.buckets else None
        feeds = step_io.step_feeds(step, bucket)
        io = self._io
        for name, arr in feeds.arrays.items():
            if self._dev_type == "cpu":
                io.bind_cpu_input(name, arr)
            else:
                self._bind_input(name, torch.from_numpy(arr).to(dev))
        T, N = feeds.num_tokens, feeds.num_logits
        # one spare row: onnxruntime refuses a null pointer, which torch gives an empty tensor
        logits = torch.empty((N + 1, self.vocab_size), dtype=torch.float32, device=dev)[:N]
        self._io.bind_output("logits", self._dev_type, self._dev_id, np.float32, (N, self.vocab_size),
                             logits.data_ptr() or logits.untyped_storage().data_ptr())
        medusa = None
        if self.num_medusa_heads:
            H = self.num_medusa_heads
            medusa = torch.empty((N + 1, H, self.vocab_size), dtype=torch.float32, device=dev)[:N]
            self._io.bind_output(step_io.MEDUSA_LOGITS, self._dev_type, self._dev_id, np.float32,
                                 (N, H, self.vocab_size), medusa.data_ptr() or medusa.untyped_storage().data_ptr())
        new_k, new_v = [], []
        for i in range(self.num_layers):
            k = torch.empty((T, self.num_kv_heads, self.head_dim), dtype=self.dtype, device=dev)
            v = torch.empty_like(k)
            self._bind_output(step_io.new_k_name(i), k)
            self._bind_output(step_io.new_v_name(i), v)
            new_k.append(k)
            new_v.append(v)
        if self._dev_type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        self.session.run_with_iobinding(io)
        self._last = (new_k, new_v)
        self._medusa = medusa
        slots = torch.from_numpy(step.slot_mapping).to(dev).long()
        keep = slots >= 0
        if bool(keep.all()):
            self._write(new_k, new_v, None, slots)
        else:
            self._write(new_k, new_v, keep.nonzero().squeeze(1), slots[keep])
        return logits.cpu() if self._dev_type == "cuda" else logits

    def _write(self, new_k, new_v, idx: torch.Tensor | None, slots: torch.Tensor) -> None:
        for kc, vc, k, v in zip(self.k_caches, self.v_caches, new_k, new_v):
            kc.view(-1, *kc.shape[2:])[slots] = k if idx is None else k[idx]
            vc.view(-1, *vc.shape[2:])[slots] = v if idx is None else v[idx]

    def medusa_logits(self) -> torch.Tensor:
        if self._medusa is None:
            return super().medusa_logits()
        return self._medusa.cpu()

    @torch.inference_mode()
    def commit_kv(self, token_indices, slots) -> None:
        """Write the last step's K/V of tokens `token_indices` to `slots` (draft trees)."""
        if self._last is None:
            raise RuntimeError("commit_kv called before any forward")
        dev = self.device
        self._write(*self._last, torch.as_tensor(token_indices, device=dev).long(),
                    torch.as_tensor(slots, device=dev).long())
