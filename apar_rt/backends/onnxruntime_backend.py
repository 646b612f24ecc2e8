"""The `onnxruntime` backend: an engine folder's model.onnx in an InferenceSession.

The KV pools are numpy arrays on the CPU (torch tensors on CUDA, with the CUDA execution
provider) bound to the session by pointer through one IOBinding, so a step copies no pool: the
session reads them in place, the new K/V come back in output buffers bound by pointer, and the
runtime writes them into the pool at the step's slots. Steps are padded to the engine's batch
buckets with null-block sequences (see `apar_rt.export.step_io`).

On the CPU this module needs no torch: it returns numpy logits, and an engine folder runs with
onnxruntime, numpy and tokenizers alone (a fast start). torch is imported only for a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from apar_rt.backends.base import Backend, BackendUnavailable, load_engine_folder
from apar_rt.build.manifest import ONNX_NAME
from apar_rt.core import StepInput
from apar_rt.export import step_io

_NUMPY = {"float32": np.float32, "float16": np.float16}


def _check_dtype(requested: str | None, built: str) -> None:
    if requested not in (None, "auto", built):
        raise ValueError(f"dtype {requested!r} differs from the engine's dtype {built!r} (fixed at build "
                         f"time); "
                         f"pass --dtype auto or rebuild with --dtype {requested}")


def _torch_cuda() -> bool:
    """Whether torch is installed with a usable CUDA device (torch holds the pools on CUDA)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _device(requested: str | None) -> tuple[str, int]:
    """(device type, index): "cpu" unless CUDA is asked for or onnxruntime and torch both have it.
    torch is imported only when onnxruntime has its CUDA execution provider."""
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if requested is None:
        return ("cuda", 0) if cuda_ep and _torch_cuda() else ("cpu", 0)
    kind, _, index = str(requested).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ValueError(f"the onnxruntime backend runs on cpu or cuda[:N], not {requested!r}")
    if kind == "cuda" and not (cuda_ep and _torch_cuda()):
        raise BackendUnavailable(f"device {requested!r} needs onnxruntime's CUDAExecutionProvider and a CUDA "
                                 f"build of torch; available providers: "
                                 f"{', '.join(ort.get_available_providers())}")
    return kind, int(index or 0)


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
                 threads: int | None = None, check_hashes: bool = True,
                 medusa_dir: str | None = None) -> None:
        self.engine_dir = Path(engine_dir)
        self.manifest, self.num_medusa_heads = load_engine_folder(engine_dir, self.name, check_hashes=check_hashes,
                                                                  medusa_dir=medusa_dir)
        m = self.manifest
        _check_dtype(dtype, m.dtype)
        if m.dtype not in ("float32", "float16"):
            raise BackendUnavailable(f"the onnxruntime backend runs float32 or float16 engines, "
                                     f"not {m.dtype}")
        self._dev_type, self._dev_id = _device(device)
        self.device = self._dev_type if self._dev_type == "cpu" else f"cuda:{self._dev_id}"
        self.dtype = m.dtype            # "float32" or "float16"
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
        if self._dev_type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self._dev_id}),
                         "CPUExecutionProvider"]
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
        self._io = self.session.io_binding()
        self.block_size = m.block_size
        self.k_caches: list = []          # per layer: numpy arrays (CPU) or torch tensors (CUDA)
        self.v_caches: list = []
        self._last: tuple | None = None   # (new_k, new_v) of the last forward, for commit_kv
        self._medusa = None               # the last forward's Medusa logits

    # ---- the pool ------------------------------------------------------------------------

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        if block_size != self.manifest.block_size:
            raise ValueError(f"block_size {block_size} differs from the engine's block size "
                             f"{self.manifest.block_size} (fixed at build time)")
        if self.manifest.max_num_blocks and num_blocks > self.manifest.max_num_blocks:
            raise ValueError(f"num_blocks {num_blocks} exceeds the engine's max_num_blocks "
                             f"{self.manifest.max_num_blocks}")
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        if self._dev_type == "cpu":
            zeros = lambda: np.zeros(shape, _NUMPY[self.dtype])  # noqa: E731
        else:
            import torch

            zeros = lambda: torch.zeros(shape, dtype=getattr(torch, self.dtype), device=self.device)  # noqa: E731
        self.k_caches = [zeros() for _ in range(self.num_layers)]
        self.v_caches = [zeros() for _ in range(self.num_layers)]
        for i, (k, v) in enumerate(zip(self.k_caches, self.v_caches)):
            self._bind_input(step_io.k_cache_name(i), k)
            self._bind_input(step_io.v_cache_name(i), v)

    def kv_bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * \
            np.dtype(_NUMPY[self.dtype]).itemsize

    def _bind_input(self, name: str, t) -> None:
        """Bind a pool (numpy array on the CPU, torch tensor on CUDA) by pointer."""
        ptr = t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr()
        self._io.bind_input(name, self._dev_type, self._dev_id, _NUMPY[self.dtype], tuple(t.shape), ptr)

    # ---- one step --------------------------------------------------------------------------

    def forward(self, step: StepInput):
        """Logits [N, vocab] float32: numpy on the CPU, a CPU torch tensor on CUDA."""
        if not self.k_caches:
            raise RuntimeError("allocate_kv must be called before forward")
        cpu = self._dev_type == "cpu"
        if step.block_copies:
            src = [s for s, _ in step.block_copies]
            dst = [d for _, d in step.block_copies]
            if cpu:
                for pool in (*self.k_caches, *self.v_caches):
                    pool[dst] = pool[src]
            else:
                import torch

                src_t, dst_t = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
                for cache in (*self.k_caches, *self.v_caches):
                    cache[dst_t] = cache[src_t]
        bucket = step_io.pick_bucket(int(step.block_tables.shape[0]), self.buckets) if self.buckets else None
        feeds = step_io.step_feeds(step, bucket)
        io = self._io
        self._keep: list = []
        for name, arr in feeds.arrays.items():
            if cpu:
                io.bind_cpu_input(name, arr)
            else:
                import torch

                t = torch.from_numpy(arr).to(self.device)
                self._io.bind_input(name, "cuda", self._dev_id, arr.dtype, tuple(arr.shape), t.data_ptr())
                self._keep.append(t)   # alive until the run
        T, N, V = feeds.num_tokens, feeds.num_logits, self.vocab_size
        # a spare row each: onnxruntime refuses the null pointer of an empty buffer
        logits = self._output("logits", (N, V), "float32")
        medusa = None
        if self.num_medusa_heads:
            medusa = self._output(step_io.MEDUSA_LOGITS, (N, self.num_medusa_heads, V), "float32")
        kv_shape = (T, self.num_kv_heads, self.head_dim)
        new_k = [self._output(step_io.new_k_name(i), kv_shape, self.dtype) for i in range(self.num_layers)]
        new_v = [self._output(step_io.new_v_name(i), kv_shape, self.dtype) for i in range(self.num_layers)]
        if not cpu:
            import torch

            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(io)
        self._last = (new_k, new_v)
        self._medusa = medusa
        slots = step.slot_mapping
        keep = slots >= 0
        if keep.all():
            self._write(new_k, new_v, None, slots)
        else:
            self._write(new_k, new_v, np.flatnonzero(keep), slots[keep])
        return logits if cpu else logits.cpu()

    def _output(self, name: str, shape: tuple, dtype: str):
        """A fresh buffer bound to output `name`: numpy on the CPU, a torch tensor on CUDA."""
        rows = (shape[0] + 1, *shape[1:])
        if self._dev_type == "cpu":
            buf = np.empty(rows, _NUMPY[dtype])[:shape[0]]
            ptr = buf.ctypes.data
        else:
            import torch

            buf = torch.empty(rows, dtype=getattr(torch, dtype), device=self.device)[:shape[0]]
            ptr = buf.untyped_storage().data_ptr()
        self._io.bind_output(name, self._dev_type, self._dev_id, _NUMPY[dtype], shape, ptr)
        return buf

    def _write(self, new_k, new_v, idx, slots) -> None:
        """pool[slot] = new[idx] per layer (idx None: all rows); numpy on the CPU, torch on CUDA."""
        if self._dev_type == "cpu":
            pools = zip(self.k_caches, self.v_caches, new_k, new_v)
        else:
            import torch

            slots = torch.as_tensor(np.asarray(slots), device=self.device).long()
            idx = None if idx is None else torch.as_tensor(np.asarray(idx), device=self.device).long()
            pools = zip(self.k_caches, self.v_caches, new_k, new_v)
        for kc, vc, k, v in pools:
            kc.reshape(-1, *kc.shape[2:])[slots] = k if idx is None else k[idx]
            vc.reshape(-1, *vc.shape[2:])[slots] = v if idx is None else v[idx]

    def medusa_logits(self):
        if self._medusa is None:
            return super().medusa_logits()
        return self._medusa if self._dev_type == "cpu" else self._medusa.cpu()

    def commit_kv(self, token_indices, slots) -> None:
        """Write the last step's K/V of tokens `token_indices` to `slots` (draft trees)."""
        if self._last is None:
            raise RuntimeError("commit_kv called before any forward")
        self._write(*self._last, np.asarray(token_indices, np.int64), np.asarray(slots, np.int64))
