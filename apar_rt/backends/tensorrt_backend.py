"""The `tensorrt` backend: an engine folder's model.plan through the Backend interface.

The plan (built by full TensorRT or TensorRT-RTX, apar_rt/trt/library.py) holds a decode profile
per batch bucket and prefill profiles for small batches. A step runs as one decode run plus, when
it holds prefills, prefill runs of a few sequences (apar_rt/backends/step_split.py), each padded
to its profile's batch with null-block sequences, on that profile's execution context. All
contexts are created when the backend loads and share one device-memory block (they run one at
a time on the backend's stream). The KV pools, inputs and outputs are torch CUDA tensors whose
addresses are given to TensorRT, so nothing is copied but the small step inputs. New K/V are
written into the pools at the step's slots after all runs, as the op contract asks.

TensorRT is imported only through apar_rt.trt.library; the plugin (when the plan has one) is
loaded by apar_rt.trt.plugin.load_plugin, the contract the builder and --check also use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apar_rt.backends.base import Backend, BackendUnavailable, load_engine_folder
from apar_rt.backends.device import resolve_device
from apar_rt.backends.step_split import split_step
from apar_rt.build.manifest import EngineLoadError
from apar_rt.core import StepInput
from apar_rt.export import step_io

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TensorRTBackend(Backend):
    """Runs the TensorRT plan of an engine folder built with `apar-rt build --backend tensorrt`.

    Args:
        engine_dir: the engine folder (its manifest is verified, sha256 included).
        dtype: "auto" or the engine's dtype.
        device: "cuda" or "cuda:i" (None: the current CUDA device).
        plugin: overrides the plugin recorded at build time ("python" or a library path).
        check_hashes: verify the sha256 of every engine file on load.
        medusa_dir: given when Medusa is asked for; the heads are in the engine, so this only checks
            that it was built with them.

    Raises:
        BackendUnavailable: no TensorRT, no CUDA, a GPU the plan was not built for, or a plan this
            TensorRT cannot load.
        EngineLoadError: the folder is not a TensorRT engine folder, or is corrupt.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: str, *, dtype: str | None = "auto", device: str | None = None,
                 plugin: str | None = None, check_hashes: bool = True, medusa_dir: str | None = None) -> None:
        from apar_rt.trt import library
        from apar_rt.trt.plugin import PluginError, load_plugin, spec_of

        self.engine_dir = Path(engine_dir)
        self.manifest, self.num_medusa_heads = load_engine_folder(engine_dir, self.name, check_hashes=check_hashes,
                                                                  medusa_dir=medusa_dir)
        m = self.manifest
        if dtype not in (None, "auto", m.dtype):
            raise ValueError(f"dtype {dtype!r} differs from the engine's dtype {m.dtype!r} "
                             f"(fixed at build time)")
        rec = m.engines[0]
        try:
            lib = library.load(rec.get("library"))
        except library.TensorRTUnavailable as e:
            raise BackendUnavailable(str(e)) from None
        if rec.get("library_version") != lib.version:
            raise EngineLoadError(f"{self.engine_dir / rec['file']} was built with {rec.get('library')} "
                                  f"{rec.get('library_version')}, but this is {lib.label}; rebuild it here "
                                  f"(TensorRT plans are tied to the library version)")
        if not torch.cuda.is_available():
            raise BackendUnavailable("the tensorrt backend needs an NVIDIA GPU and a CUDA build of torch")
        self.device = resolve_device(device, runner=f"the {self.name} backend", cuda_only=True)
        props = torch.cuda.get_device_properties(self.device)
        try:
            library.check_device(rec, f"{props.major}.{props.minor}", props.name)
        except library.PlanNotForThisGPU as e:
            raise BackendUnavailable(str(e)) from None
        torch.cuda.set_device(self.device)
        self.lib, self.trt = lib, lib.module
        trt = lib.module
        self.dtype = _TORCH[m.dtype]
        cfg = m.model_config
        self.num_layers = int(cfg["num_hidden_layers"])
        self.num_kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = int(cfg["head_dim"])
        self.vocab_size = int(cfg["vocab_size"])
        self.block_size = m.block_size
        self.attention = rec.get("attention")

        spec = plugin or spec_of(rec.get("plugin"))
        if self.attention == "plugin":
            try:
                load_plugin(lib, spec, expect_sha256=None if plugin else (rec.get("plugin") or {}).get("sha256"))
            except PluginError as e:
                raise BackendUnavailable(str(e)) from None
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine((self.engine_dir / rec["file"]).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"{lib.label} could not deserialize {self.engine_dir / rec['file']} "
                                     f"(see the TensorRT log above)")
        self._check_io(trt)
        self.profiles = {(p["kind"], p["batch"]): p for p in rec["profiles"]}
        self.decode_buckets = sorted(b for k, b in self.profiles if k == "decode")
        self.prefill_buckets = sorted(b for k, b in self.profiles if k == "prefill")
        self.max_decode_q = max(p["max_q"] for p in rec["profiles"] if p["kind"] == "decode")
        self.stream = torch.cuda.Stream(self.device)
        size = int(self.engine.device_memory_size_v2)
        self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        user = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._contexts = {}
        for key, p in self.profiles.items():          # all at load: none is created while serving
            ctx = self.engine.create_execution_context(user)
            if ctx is None:
                raise BackendUnavailable(f"{lib.label} could not create an execution context for profile "
                                         f"{p['index']} ({p['kind']}, batch {p['batch']})")
            ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            if not ctx.set_optimization_profile_async(p["index"], self.stream.cuda_stream):
                raise BackendUnavailable(f"{lib.label} refused optimization profile {p['index']}")
            self._contexts[key] = ctx
        self.stream.synchronize()
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
        with torch.cuda.stream(self.stream):     # zero-filled on the stream the steps run on
            self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
            self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.stream.synchronize()

    def kv_bytes_per_block(self) -> int:
        k = self.k_caches[0]
        return 2 * self.num_layers * k[0].numel() * k.element_size()

    # ---- one step --------------------------------------------------------------------------

    def _set_shape(self, ctx, key, name: str, shape: tuple) -> None:
        if not ctx.set_input_shape(name, shape):
            p = self.profiles[key]
            raise RuntimeError(f"TensorRT refused input {name} shape {list(shape)} in the {p['kind']} profile of "
                               f"batch {p['batch']} (its range: {p['shapes'].get(name)}); the step does not fit "
                               f"the engine's build limits")

    def _run(self, kind: str, sub: StepInput, outs_logits: torch.Tensor, rows: np.ndarray,
             new_k, new_v, tokens: np.ndarray, medusa) -> None:
        """Run one sub-step on its profile; scatter its outputs into the full step's buffers."""
        dev = self.device
        buckets = self.decode_buckets if kind == "decode" else self.prefill_buckets
        bucket = step_io.pick_bucket(int(sub.block_tables.shape[0]), buckets)
        key = (kind, bucket)
        ctx = self._contexts[key]
        feeds = step_io.step_feeds(sub, bucket, min_logits=1)
        keep_alive = []
        for name, arr in feeds.arrays.items():
            t = torch.from_numpy(arr).to(dev, non_blocking=False)
            keep_alive.append(t)
            self._set_shape(ctx, key, name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for i, (k, v) in enumerate(zip(self.k_caches, self.v_caches)):
            for name, pool in ((step_io.k_cache_name(i), k), (step_io.v_cache_name(i), v)):
                self._set_shape(ctx, key, name, tuple(pool.shape))
                ctx.set_tensor_address(name, pool.data_ptr())
        T = feeds.num_tokens
        n_rows = int(feeds.arrays["logits_indices"].shape[0])
        logits = torch.empty((n_rows, self.vocab_size), dtype=torch.float32, device=dev)
        ctx.set_tensor_address("logits", logits.data_ptr())
        med = None
        if self.num_medusa_heads:
            med = torch.empty((n_rows, self.num_medusa_heads, self.vocab_size), dtype=torch.float32, device=dev)
            ctx.set_tensor_address(step_io.MEDUSA_LOGITS, med.data_ptr())
        ks, vs = [], []
        for i in range(self.num_layers):
            k = torch.empty((T, self.num_kv_heads, self.head_dim), dtype=self.dtype, device=dev)
            v = torch.empty_like(k)
            ctx.set_tensor_address(step_io.new_k_name(i), k.data_ptr())
            ctx.set_tensor_address(step_io.new_v_name(i), v.data_ptr())
            ks.append(k)
            vs.append(v)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        n = feeds.num_logits
        rows_t = torch.as_tensor(rows, device=dev)
        outs_logits[rows_t] = logits[:n]
        if medusa is not None:
            medusa[rows_t] = med[:n]
        tok = torch.as_tensor(tokens, device=dev)
        for i in range(self.num_layers):
            new_k[i][tok] = ks[i]
            new_v[i][tok] = vs[i]
        self.stream.synchronize()     # the feeds' host-to-device copies and keep_alive end here
        del keep_alive

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        if not self.k_caches:
            raise RuntimeError("allocate_kv must be called before forward")
        dev = self.device
        T, N = step.num_tokens, int(step.logits_indices.shape[0])
        max_prefill = self.prefill_buckets[-1] if self.prefill_buckets else 0
        subs = split_step(step, self.max_decode_q, max_prefill)
        if any(s.kind == "prefill" for s in subs) and not max_prefill:
            raise RuntimeError(f"a sequence brings more than {self.max_decode_q} new tokens, and the engine has "
                               f"no prefill profile")
        with torch.cuda.stream(self.stream):
            if step.block_copies:
                src = torch.tensor([s for s, _ in step.block_copies], device=dev)
                dst = torch.tensor([d for _, d in step.block_copies], device=dev)
                for cache in (*self.k_caches, *self.v_caches):
                    cache[dst] = cache[src]
            logits = torch.empty((N, self.vocab_size), dtype=torch.float32, device=dev)
            medusa = (torch.empty((N, self.num_medusa_heads, self.vocab_size), dtype=torch.float32, device=dev)
                      if self.num_medusa_heads else None)
            shape = (T, self.num_kv_heads, self.head_dim)
            new_k = [torch.empty(shape, dtype=self.dtype, device=dev) for _ in range(self.num_layers)]
            new_v = [torch.empty(shape, dtype=self.dtype, device=dev) for _ in range(self.num_layers)]
            for sub in subs:                      # (their block_copies were done above, once)
                self._run(sub.kind, sub.step, logits, sub.logits_rows, new_k, new_v, sub.tokens, medusa)
            self._last = (new_k, new_v)
            slots = torch.from_numpy(step.slot_mapping).to(dev).long()
            keep = slots >= 0
            self._write(new_k, new_v, keep.nonzero().squeeze(1), slots[keep])
            out = logits.cpu()
            self._medusa = medusa.cpu() if medusa is not None else None
        self.stream.synchronize()
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
