"""The `tensorrt` backend: an engine folder's model.plan through the Backend interface.

One engine holds one optimization profile per batch bucket (min = opt = max for the batch
axis). A step of B sequences runs in the smallest bucket >= B, padded with null-block
sequences, on that profile's execution context; all contexts share one device-memory block
(they run one at a time on one stream). The KV pools, inputs and outputs are torch CUDA
tensors whose addresses are given to TensorRT, so nothing is copied but the small step
inputs. New K/V are written into the pools at the step's slots after the run, as the op
contract asks.

`tensorrt` is imported only inside this class (and in apar_rt/build/tensorrt_builder.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apar_rt.backends.base import Backend, BackendUnavailable, load_engine_folder
from apar_rt.build.manifest import EngineLoadError
from apar_rt.core import StepInput
from apar_rt.export import step_io

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TensorRTBackend(Backend):
    """Runs the TensorRT engine of an engine folder built with `apar-rt build --backend tensorrt`.

    Args:
        engine_dir: the engine folder (its manifest is verified, sha256 included).
        dtype: "auto" or the engine's dtype.
        device: "cuda" or "cuda:i" (None: the current CUDA device).
        plugin_lib: the TreePagedAttention plugin library (default: the one recorded at build time,
            needed only when the engine uses the plugin).
        check_hashes: verify the sha256 of every engine file on load.
        medusa_dir: given when Medusa is asked for; the heads are in the engine, so this only checks
            that it was built with them.

    Raises:
        BackendUnavailable: no TensorRT, no CUDA, or an engine this TensorRT cannot load.
        EngineLoadError: the folder is not a TensorRT engine folder, or is corrupt.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: str, *, dtype: str | None = "auto", device: str | None = None,
                 plugin_lib: str | None = None, check_hashes: bool = True,
                 medusa_dir: str | None = None) -> None:
        from apar_rt.build.tensorrt_builder import TensorRTUnavailable, import_tensorrt

        self.engine_dir = Path(engine_dir)
        self.manifest, self.num_medusa_heads = load_engine_folder(engine_dir, self.name, check_hashes=check_hashes,
                                                                  medusa_dir=medusa_dir)
        m = self.manifest
        if dtype not in (None, "auto", m.dtype):
            raise ValueError(f"dtype {dtype!r} differs from the engine's dtype {m.dtype!r} "
                             f"(fixed at build time)")
        try:
            trt = import_tensorrt()
        except TensorRTUnavailable as e:
            raise BackendUnavailable(str(e)) from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("the tensorrt backend needs an NVIDIA GPU and a CUDA build of torch")
        self.trt = trt
        rec = m.engines[0]
        if rec.get("tensorrt_version") != trt.__version__:
            raise EngineLoadError(f"{self.engine_dir / rec['file']} was built with TensorRT "
                                  f"{rec.get('tensorrt_version')}, but this is TensorRT {trt.__version__}; "
                                  f"rebuild it here (TensorRT engines are tied to the version and the GPU)")
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on cuda, not {device!r}")
        torch.cuda.set_device(self.device)
        self.dtype = _TORCH[m.dtype]
        cfg = m.model_config
        self.num_layers = int(cfg["num_hidden_layers"])
        self.num_kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = int(cfg["head_dim"])
        self.vocab_size = int(cfg["vocab_size"])
        self.block_size = m.block_size
        self.attention = rec.get("attention")

        logger = trt.Logger(trt.Logger.WARNING)
        lib = plugin_lib or (rec.get("plugin_lib") if self.attention == "plugin" else None)
        if self.attention == "plugin" and not lib:
            raise BackendUnavailable("the engine uses the TreePagedAttention plugin; "
                                     "pass its library (plugin_lib)")
        if lib:
            if not Path(lib).is_file():
                raise BackendUnavailable(f"plugin library {lib} does not exist")
            trt.get_plugin_registry().load_library(str(lib))
        trt.init_libnvinfer_plugins(logger, "")
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine((self.engine_dir / rec["file"]).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize {self.engine_dir / rec['file']} "
                                     f"(wrong GPU, TensorRT version or missing plugin; see the log above)")
        self.profiles = {p["batch"]: p["index"] for p in rec["profiles"]}
        self.buckets = sorted(self.profiles)
        self._check_io(trt)
        self.stream = torch.cuda.Stream(self.device)
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        self._user_memory = strategy is not None and hasattr(self.engine, "device_memory_size_v2")
        self._scratch = None
        if self._user_memory:
            size = int(self.engine.device_memory_size_v2)
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self._contexts: dict[int, object] = {}
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self._last: tuple | None = None
        self._medusa: torch.Tensor | None = None

    def _check_io(self, trt) -> None:
        want = {name: (trt.int32 if name != "mask" else trt.bool) for name in step_io.STEP_INPUTS}
        kv = {"float32": trt.float32, "float16": trt.float16, "bfloat16": getattr(trt, "bfloat16", None)}[
            self.manifest.dtype]
        for i in range(self.num_layers):
            for name in (step_io.k_cache_name(i), step_io.v_cache_name(i), step_io.new_k_name(i),
                         step_io.new_v_name(i)):
                want[name] = kv
        want["logits"] = trt.float32
        if self.num_medusa_heads:
            want[step_io.MEDUSA_LOGITS] = trt.float32
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(want):
            raise BackendUnavailable(f"the engine's tensors {sorted(names)} are not the step graph's "
                                     f"{sorted(want)}")
        for name, dt in want.items():
            got = self.engine.get_tensor_dtype(name)
            if got != dt:
                raise BackendUnavailable(f"engine tensor {name} has dtype {got}, expected {dt}")

    def _context(self, profile: int):
        ctx = self._contexts.get(profile)
        if ctx is None:
            trt = self.trt
            if self._user_memory:
                user = trt.ExecutionContextAllocationStrategy.USER_MANAGED
                ctx = self.engine.create_execution_context(user)
                ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            else:
                ctx = self.engine.create_execution_context()
            if ctx is None:
                raise RuntimeError(f"TensorRT could not create an execution context for profile {profile}")
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._contexts[profile] = ctx
        return ctx

    # ---- the pool ------------------------------------------------------------------------

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        if block_size != self.block_size:
            raise ValueError(f"block_size {block_size} differs from the engine's block size "
                             f"{self.block_size} (fixed at build time)")
        limit = self.manifest.max_num_blocks
        if limit and num_blocks > limit:
            raise ValueError(f"num_blocks {num_blocks} exceeds the engine's max_num_blocks {limit} "
                             f"(fixed at build time)")
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        zeros = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self.k_caches = [zeros() for _ in range(self.num_layers)]
        self.v_caches = [zeros() for _ in range(self.num_layers)]

    def kv_bytes_per_block(self) -> int:
        k = self.k_caches[0]
        return 2 * self.num_layers * k[0].numel() * k.element_size()

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        if not self.k_caches:
            raise RuntimeError("allocate_kv must be called before forward")
        dev = self.device
        with torch.cuda.stream(self.stream):
            if step.block_copies:
                src = torch.tensor([s for s, _ in step.block_copies], device=dev)
                dst = torch.tensor([d for _, d in step.block_copies], device=dev)
                for cache in (*self.k_caches, *self.v_caches):
                    cache[dst] = cache[src]
            bucket = step_io.pick_bucket(int(step.block_tables.shape[0]), self.buckets)
            feeds = step_io.step_feeds(step, bucket, min_logits=1)
            ctx = self._context(self.profiles[bucket])
            keep_alive = []
            for name, arr in feeds.arrays.items():
                t = torch.from_numpy(arr).to(dev, non_blocking=False)
                keep_alive.append(t)
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            for i, (k, v) in enumerate(zip(self.k_caches, self.v_caches)):
                for name, pool in ((step_io.k_cache_name(i), k), (step_io.v_cache_name(i), v)):
                    ctx.set_input_shape(name, tuple(pool.shape))
                    ctx.set_tensor_address(name, pool.data_ptr())
            T = feeds.num_tokens
            n_rows = int(feeds.arrays["logits_indices"].shape[0])
            logits = torch.empty((n_rows, self.vocab_size), dtype=torch.float32, device=dev)
            ctx.set_tensor_address("logits", logits.data_ptr())
            medusa = None
            if self.num_medusa_heads:
                medusa = torch.empty((n_rows, self.num_medusa_heads, self.vocab_size), dtype=torch.float32,
                                     device=dev)
                ctx.set_tensor_address(step_io.MEDUSA_LOGITS, medusa.data_ptr())
            new_k, new_v = [], []
            for i in range(self.num_layers):
                k = torch.empty((T, self.num_kv_heads, self.head_dim), dtype=self.dtype, device=dev)
                v = torch.empty_like(k)
                ctx.set_tensor_address(step_io.new_k_name(i), k.data_ptr())
                ctx.set_tensor_address(step_io.new_v_name(i), v.data_ptr())
                new_k.append(k)
                new_v.append(v)
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
            self._last = (new_k, new_v)
            slots = torch.from_numpy(step.slot_mapping).to(dev).long()
            keep = slots >= 0
            idx = keep.nonzero().squeeze(1)
            self._write(new_k, new_v, idx, slots[keep])
            out = logits[:feeds.num_logits].cpu()
            self._medusa = medusa[:feeds.num_logits].cpu() if medusa is not None else None
        self.stream.synchronize()
        del keep_alive
        return out

    def _write(self, new_k, new_v, idx: torch.Tensor, slots: torch.Tensor) -> None:
        for kc, vc, k, v in zip(self.k_caches, self.v_caches, new_k, new_v):
            kc.view(-1, *kc.shape[2:])[slots] = k[idx]
            vc.view(-1, *vc.shape[2:])[slots] = v[idx]

    def medusa_logits(self) -> torch.Tensor:
        if self._medusa is None:
            return super().medusa_logits()
        return self._medusa

    @torch.inference_mode()
    def commit_kv(self, token_indices, slots) -> None:
        """Write the last step's K/V of tokens `token_indices` to `slots` (draft trees)."""
        if self._last is None:
            raise RuntimeError("commit_kv called before any forward")
        with torch.cuda.stream(self.stream):
            self._write(*self._last, torch.as_tensor(np.asarray(token_indices), device=self.device).long(),
                        torch.as_tensor(np.asarray(slots), device=self.device).long())
        self.stream.synchronize()
