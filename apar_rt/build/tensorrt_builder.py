"""TensorRT plans from the step graph (full TensorRT 10.x or TensorRT-RTX, see apar_rt/trt/library.py).

What it does:

* parse model.onnx (external weights next to it are found by the parser);
* with a plugin (`apar_rt.trt.plugin.load_plugin`: the built-in Python IPluginV3 or a shared
  library), the parser maps each `apar.TreePagedAttention` node to a PLUGIN_V3 layer through its
  `plugin_namespace` attribute; otherwise it inlines the model-local function. The build counts
  the plugin layers and refuses anything but 0 (no plugin) or one per attention layer (plugin);
* optimization profiles (`plan_profiles`): per batch bucket a decode profile (at most
  `max_decode_q` new tokens per sequence: 1, or a Medusa draft tree), and for the small buckets
  a prefill profile (up to `max_num_tokens` new tokens); the batch axis is fixed in each;
* precision: the ONNX graph is already in the engine dtype and the network is strongly typed;
* the GPU targets (TensorRT-RTX: compute capabilities set on the builder config);
* an optional timing cache, read before and written back after the build;
* the serialized plan (`model.plan`), described for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apar_rt.export import step_io

ENGINE_NAME = "model.plan"
MAX_ELEMENTS = 2 ** 31 - 1      # TensorRT's int32 indexing: no input may hold more elements


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """One optimization profile: a fixed batch and the most new tokens it takes."""

    kind: str          # "decode" (max_q small) or "prefill"
    batch: int         # fixed batch (the bucket)
    max_tokens: int    # most new tokens in one step (T)
    max_q: int         # most new tokens of one sequence (the mask's second axis)


def plan_profiles(buckets: list[int], max_num_tokens: int, max_decode_q: int,
                  max_prefill_batch: int) -> list[ProfileSpec]:
    """Decode profiles for every bucket, prefill profiles for buckets <= max_prefill_batch.

    A step whose sequences all have <= max_decode_q new tokens runs in a decode profile; other
    steps run their prefill sequences in prefill profiles (at most max_prefill_batch at a time)
    and the rest in a decode profile, so no profile is sized for a long prefill at a large batch.
    """
    out = []
    for b in buckets:
        q = min(max_decode_q, max_num_tokens)
        out.append(ProfileSpec("decode", b, min(max_num_tokens, b * q), q))
    if max_decode_q < max_num_tokens:
        for b in buckets:
            if b <= max_prefill_batch:
                out.append(ProfileSpec("prefill", b, max_num_tokens, max_num_tokens))
    return out


def profile_shapes(spec: ProfileSpec, cfg: dict, *, block_size: int, max_blocks_per_seq: int,
                   max_num_blocks: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every input of the step graph for one profile."""
    b, T, Q, MB = spec.batch, spec.max_tokens, spec.max_q, max_blocks_per_seq
    t_opt = max(1, min(T, b if spec.kind == "decode" else T))
    q_opt = 1 if spec.kind == "decode" else Q
    hkv, d = int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
    shapes = {
        "input_ids": ((1,), (t_opt,), (T,)),
        "positions": ((1,), (t_opt,), (T,)),
        "block_tables": ((b, 1), (b, MB), (b, MB)),
        "context_lens": ((b,), (b,), (b,)),
        "query_start": ((b + 1,), (b + 1,), (b + 1,)),
        "mask": ((1, 1), (t_opt, min(q_opt, t_opt)), (T, Q)),
        "logits_indices": ((1,), (min(b, T),), (T,)),   # at least one row (the backend pads)
    }
    pool = ((2, block_size, hkv, d), (max_num_blocks, block_size, hkv, d), (max_num_blocks, block_size, hkv, d))
    for i in range(int(cfg["num_hidden_layers"])):
        shapes[step_io.k_cache_name(i)] = shapes[step_io.v_cache_name(i)] = pool
    return shapes


def check_input_sizes(specs: list[ProfileSpec], cfg: dict, *, block_size: int, max_num_blocks: int) -> None:
    """ValueError naming the flag when an input would exceed MAX_ELEMENTS elements."""
    per_block = block_size * int(cfg["num_key_value_heads"]) * int(cfg["head_dim"])
    if max_num_blocks * per_block > MAX_ELEMENTS:
        raise ValueError(f"--max-num-blocks {max_num_blocks}: one layer's KV pool would hold "
                         f"{max_num_blocks * per_block:,} elements, over TensorRT's limit of {MAX_ELEMENTS:,} "
                         f"per input; at most {MAX_ELEMENTS // per_block} blocks of {block_size} tokens fit")
    for s in specs:
        if s.max_tokens * s.max_q > MAX_ELEMENTS:
            raise ValueError(f"--max-num-tokens {s.max_tokens}: the {s.kind} mask [{s.max_tokens}, {s.max_q}] "
                             f"would exceed {MAX_ELEMENTS:,} elements")


def _progress_monitor(trt, bar_factory):
    """An IProgressMonitor that drives tqdm bars, one per build phase."""
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


def plugin_layers(trt, network) -> list[str]:
    """Names of the plugin layers (any plugin interface) in a parsed network."""
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, k)}
    return [network.get_layer(i).name for i in range(network.num_layers) if network.get_layer(i).type in kinds]


def plugin_v3_layers(trt, network) -> list[str]:
    """Names of the PLUGIN_V3 layers in a parsed network."""
    kind = trt.LayerType.PLUGIN_V3
    return [network.get_layer(i).name for i in range(network.num_layers) if network.get_layer(i).type == kind]


def _device_cc() -> tuple[str | None, str | None]:
    """(compute capability "9.0", name) of CUDA device 0, or (None, None)."""
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    p = torch.cuda.get_device_properties(0)
    return f"{p.major}.{p.minor}", p.name


def parse_network(lib, onnx_path: str | Path, *, plugin: bool, logger):
    """(builder, network, parser) with model.onnx parsed; RuntimeError with the parser's errors."""
    trt = lib.module
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if plugin:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{lib.label} could not parse {onnx_path}: {errors}")
    return builder, network, parser


def build_tensorrt_engine(onnx_path: str | Path, out_dir: str | Path, *, manifest_fields: dict, dtype: str,
                          profiles: list[ProfileSpec], block_size: int, max_blocks_per_seq: int,
                          max_num_blocks: int, gpu_targets=None, timing_cache: str | Path | None = None,
                          plugin: str | None = None, workspace_bytes: int | None = None, log=print,
                          bar_factory=None) -> dict:
    """Build `out_dir/model.plan` from `onnx_path`; returns its manifest record.

    Args:
        manifest_fields: the manifest's model_config (for the profile shapes).
        dtype: the graph's dtype (float32, float16, bfloat16).
        profiles: the optimization profiles (index = position in this list); see plan_profiles.
        gpu_targets: compute capabilities ("8.6", ...) to build for (None: the library's default).
        timing_cache: a file to read (if it exists) and write back.
        plugin: "python" (apar-rt's Python IPluginV3) or a shared library registering
            apar::TreePagedAttention; None inlines the ONNX function.
        bar_factory: (phase name, steps) -> a tqdm-like bar, for build progress.

    Raises:
        TensorRTUnavailable: no TensorRT library, or full TensorRT without a GPU.
        PluginError: the plugin cannot be loaded or does not register the creator.
        ValueError: a GPU target the library cannot build for.
        RuntimeError: parsing or building failed (TensorRT's errors are in the message).
    """
    from apar_rt.trt import library
    from apar_rt.trt.plugin import load_plugin

    lib = library.load()
    trt = lib.module
    device_cc, device_name = _device_cc()
    targets = library.resolve_targets(lib, gpu_targets, device_cc)
    logger = trt.Logger(trt.Logger.WARNING)
    plugin_record = load_plugin(lib, plugin) if plugin else None
    builder, network, _parser = parse_network(lib, onnx_path, plugin=plugin is not None, logger=logger)

    num_layers = int(manifest_fields["num_hidden_layers"])
    names = plugin_layers(trt, network)
    v3 = plugin_v3_layers(trt, network)
    if plugin is not None:
        if len(v3) != num_layers or len(names) != num_layers:
            raise RuntimeError(f"with the plugin registered, expected {num_layers} PLUGIN_V3 layers (one per "
                               f"attention layer), found {len(v3)} ({len(names)} plugin layers of any kind)")
        attention = "plugin"
        log(f"attention: {len(v3)} PLUGIN_V3 layers (apar::TreePagedAttention v1, {plugin_record['kind']})")
    else:
        if names:
            raise RuntimeError(f"no plugin was asked for, yet the network has plugin layers {names}")
        attention = "function"
        log("attention: the model-local function was inlined into standard layers (no --plugin given)")

    config = builder.create_builder_config()
    library.apply_targets(lib, config, targets)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if plugin_record and plugin_record["kind"] == "library" and hasattr(config, "plugins_to_serialize"):
        config.plugins_to_serialize = [plugin_record["library"]]
        plugin_record["serialized_in_plan"] = True
    monitor = _progress_monitor(trt, bar_factory)
    if monitor is not None:
        config.progress_monitor = monitor

    if lib.rtx and timing_cache is not None:
        log(f"--timing-cache ignored: timing caches are no-ops in {lib.label}")
        timing_cache = None
    if timing_cache is not None:
        cache_bytes = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)

    records = []
    for index, spec in enumerate(profiles):
        profile = builder.create_optimization_profile()
        shapes = profile_shapes(spec, manifest_fields, block_size=block_size, max_blocks_per_seq=max_blocks_per_seq,
                                max_num_blocks=max_num_blocks)
        for name, (mn, op, mx) in shapes.items():
            profile.set_shape(name, mn, op, mx)
        config.add_optimization_profile(profile)
        records.append({"index": index, "kind": spec.kind, "batch": spec.batch, "max_tokens": spec.max_tokens,
                        "max_q": spec.max_q, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}})

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{lib.label} failed to build the plan (see the TensorRT log above)")
    out = Path(out_dir) / ENGINE_NAME
    out.write_bytes(bytes(serialized))
    if timing_cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    from apar_rt.build.manifest import engine_record_digest
    record = {"file": ENGINE_NAME, "library": lib.name, "library_version": lib.version, "gpu_targets": targets,
              "attention": attention, "plugin": plugin_record, "strongly_typed": True, "dtype": dtype,
              "profiles": records, "built_on": {"gpu": device_name, "compute_capability": device_cc}}
    record["record_sha256"] = engine_record_digest(record)
    return record
