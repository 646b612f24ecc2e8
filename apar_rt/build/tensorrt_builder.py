"""TensorRT engines from the step graph (TensorRT 10.x Python API).

With the TensorRT backend (apar_rt/backends/tensorrt_backend.py) this is the only module
that imports `tensorrt`, and it does so inside its functions. What it does:

* parse model.onnx (external weights next to it are found by the parser);
* load the plugin library when given (`IPluginRegistry.load_library`), so that the parser can
  map each `apar.TreePagedAttention` node to our plugin through its `plugin_namespace`
  attribute (TensorRT >= 10.7); otherwise the parser inlines the model-local function;
* report which one happened, by counting plugin layers in the parsed network;
* one optimization profile per batch bucket, with min = opt = max for the batch axis and
  ranges for the token, block-table and pool axes;
* precision: the ONNX graph is already in the engine dtype; the network is strongly typed
  where TensorRT offers it, else the FP16/BF16 builder flag is set;
* an optional timing cache, read before and written back after the build;
* the serialized engine (`model.plan`), described for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apar_rt.export import step_io

ENGINE_NAME = "model.plan"
MIN_TENSORRT = (10, 0)
PLUGIN_FIRST_VERSION = (10, 7)   # first TensorRT whose ONNX parser prefers a registered plugin


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU for it) is not available here; the message says what is missing."""


def import_tensorrt():
    """The `tensorrt` module, or TensorRTUnavailable naming what failed."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT is not installed (import tensorrt failed: {e}). Install TensorRT 10.x for your CUDA "
            f"version (for example `pip install tensorrt-cu12`) on a machine with an NVIDIA GPU, or build "
            f"with --backend onnxruntime") from None
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: apar-rt needs TensorRT >= 10.0")
    return trt


def tensorrt_version() -> str:
    return import_tensorrt().__version__


@dataclass(frozen=True, slots=True)
class ShapeLimits:
    """Ranges of the step graph's dynamic axes (min, max); batch is fixed per profile."""

    max_num_tokens: int
    max_blocks_per_seq: int
    max_num_blocks: int

    def profile_shapes(self, batch: int, cfg: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of every input for a profile of fixed `batch`."""
        T, MB, NB = self.max_num_tokens, self.max_blocks_per_seq, self.max_num_blocks
        t_opt = max(1, min(T, batch))          # decode steps dominate: one token per sequence
        hkv, d = int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
        shapes = {
            "input_ids": ((1,), (t_opt,), (T,)),
            "positions": ((1,), (t_opt,), (T,)),
            "block_tables": ((batch, 1), (batch, MB), (batch, MB)),
            "context_lens": ((batch,), (batch,), (batch,)),
            "query_start": ((batch + 1,), (batch + 1,), (batch + 1,)),
            "mask": ((1, 1), (t_opt, 1), (T, T)),
            # logits rows: at least one (the backend pads), at most one per token
            "logits_indices": ((1,), (batch,), (T,)),
        }
        pool = ((2, 1, hkv, d), (NB, 1, hkv, d), (NB, 1, hkv, d))
        for i in range(int(cfg["num_hidden_layers"])):
            for name in (step_io.k_cache_name(i), step_io.v_cache_name(i)):
                shapes[name] = pool
        return shapes


def _with_block_size(shapes: dict, block_size: int) -> dict:
    out = {}
    for name, (mn, op, mx) in shapes.items():
        if name.startswith(("k_cache_", "v_cache_")):
            mn, op, mx = ((s[0], block_size, *s[2:]) for s in (mn, op, mx))
        out[name] = (tuple(mn), tuple(op), tuple(mx))
    return out


def _progress_monitor(trt, bar_factory):
    """An IProgressMonitor that drives tqdm bars, one per build phase (TensorRT >= 10.0)."""
    if bar_factory is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = bar_factory(phase_name, num_steps)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            return True

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


def attention_layers(trt, network) -> tuple[int, list[str]]:
    """(number of plugin layers, their names) in a parsed network."""
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
             if hasattr(trt.LayerType, k)}
    names = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            names.append(layer.name)
    return len(names), names


def build_tensorrt_engine(onnx_path: str | Path, out_dir: str | Path, *, manifest_fields: dict, dtype: str,
                          buckets: list[int], limits: ShapeLimits, block_size: int,
                          timing_cache: str | Path | None = None, plugin_lib: str | Path | None = None,
                          workspace_bytes: int | None = None, log=print, bar_factory=None) -> dict:
    """Build `out_dir/model.plan` from `onnx_path`; returns its manifest record.

    Args:
        manifest_fields: the manifest's model_config (for the profile shapes).
        dtype: the graph's dtype (float32, float16, bfloat16).
        buckets: batch sizes, one optimization profile each (index = position in this list).
        limits: ranges of the other dynamic axes.
        timing_cache: a file to read (if it exists) and write back.
        plugin_lib: a shared library registering the apar::TreePagedAttention IPluginV3 creator.
        bar_factory: (phase name, steps) -> a tqdm-like bar, for build progress.

    Raises:
        TensorRTUnavailable: no TensorRT.
        RuntimeError: parsing or building failed (TensorRT's errors are in the message).
    """
    trt = import_tensorrt()
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    logger = trt.Logger(trt.Logger.WARNING)
    registry = trt.get_plugin_registry()
    plugin_handle = None
    if plugin_lib is not None:
        plugin_handle = registry.load_library(str(plugin_lib))
        if plugin_handle is None:
            raise RuntimeError(f"TensorRT could not load the plugin library {plugin_lib}")
    trt.init_libnvinfer_plugins(logger, "")

    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if plugin_lib is not None and hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag,
                                                                             "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    num_layers = int(manifest_fields["num_hidden_layers"])
    n_plugins, plugin_names = attention_layers(trt, network)
    if n_plugins == num_layers:
        attention = "plugin"
        log(f"attention: {n_plugins} TreePagedAttention plugin layers (apar::TreePagedAttention v1)")
    elif n_plugins == 0:
        attention = "function"
        why = ("no plugin library was given" if plugin_lib is None else
               f"TensorRT {trt.__version__} inlines local functions" if version < PLUGIN_FIRST_VERSION else
               "the library registered no matching creator")
        log(f"attention: the model-local function was inlined into standard layers ({why})")
    else:
        raise RuntimeError(f"expected 0 or {num_layers} attention plugin layers, found {n_plugins}: "
                           f"{plugin_names}")

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not strongly_typed:
        if dtype == "float16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif dtype == "bfloat16":
            config.set_flag(trt.BuilderFlag.BF16)
    monitor = _progress_monitor(trt, bar_factory)
    if monitor is not None:
        config.progress_monitor = monitor

    cache_bytes = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    profiles = []
    for index, batch in enumerate(buckets):
        profile = builder.create_optimization_profile()
        shapes = _with_block_size(limits.profile_shapes(batch, manifest_fields), block_size)
        for name, (mn, op, mx) in shapes.items():
            profile.set_shape(name, mn, op, mx)
        config.add_optimization_profile(profile)
        profiles.append({"index": index, "batch": batch,
                         "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}})

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    out = Path(out_dir) / ENGINE_NAME
    out.write_bytes(bytes(serialized))
    if timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))

    device = {}
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            device = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}"}
    except ImportError:
        pass
    return {"file": ENGINE_NAME, "tensorrt_version": trt.__version__, "attention": attention,
            "strongly_typed": strongly_typed, "dtype": dtype, "profiles": profiles, "device": device,
            "plugin_lib": str(plugin_lib) if plugin_lib else None}
