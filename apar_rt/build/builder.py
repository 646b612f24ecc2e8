"""`apar-rt build`: a HF checkpoint becomes an engine folder (see manifest.py for its layout).

Steps, each shown on a tqdm bar: check the options and the model; export model.onnx; save
the config and tokenizer; load the graph in onnxruntime (onnxruntime engines) or build the
TensorRT engine; write manifest.json; optionally `--check` against the torch reference.
The folder is written next to the output under a temporary name and moved into place only
when complete, so a failed build leaves no half-written engine.
"""

from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from apar_rt.build.manifest import (ENGINE_BACKENDS, MANIFEST_NAME, ONNX_NAME, Manifest, config_as_json,
                                    record_files, write_manifest)
from apar_rt.config import ModelConfig, ModelLoadError

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_TRT_MAX_NUM_BLOCKS = 4096


class BuildError(ValueError):
    """A build that cannot proceed; the message names the flag or file at fault."""


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """What to build. Sizes mirror trtllm-build's flags."""

    model: str                              # HF Llama folder
    output: str                             # engine folder to create
    backend: str = "onnxruntime"            # onnxruntime | tensorrt
    dtype: str = "auto"                     # auto: float32 for onnxruntime, float16 for tensorrt
    max_batch_size: int = 8                 # most sequences (APAR branches included) in one step
    batch_buckets: tuple[int, ...] = ()     # fixed batch sizes; () = powers of two up to max_batch_size
    max_num_tokens: int = 2048              # most new tokens in one step
    max_seq_len: int | None = None          # None: the model's max_position_embeddings
    block_size: int = 16                    # KV block size
    max_num_blocks: int | None = None       # KV pool limit; None: none (onnxruntime) or 4096 (tensorrt)
    timing_cache: str | None = None         # TensorRT timing cache file (read, then written back)
    plugin: str | None = None               # TensorRT TreePagedAttention plugin: "python" or a library path
    workspace_gib: float | None = None      # TensorRT workspace limit
    gpu_targets: tuple[str, ...] = ()       # TensorRT-RTX compute capabilities; () = the library's default
    max_draft_len: int | None = None        # draft tokens per sequence in a decode step; None: 63 with Medusa
    max_prefill_batch: int = 4              # most prefilling sequences in one TensorRT run
    dry_run: bool = False                   # TensorRT: report profiles and memory, build nothing
    opset: int = 18
    external_data: bool = True              # weights in model.onnx.data; False: inside model.onnx
    medusa: bool | None = None              # export MODEL/medusa heads; None: when present
    quantize: str = "none"                  # weight-only: none | int8 | int4 (apar_rt.build.quantize)
    group_size: int = 128                   # input features per quantization scale
    symmetric: bool | None = None           # False: a zero point per group; None: the scheme's default
    quantize_lm_head: bool = False          # also the LM head and the Medusa vocabulary projections
    fit: str | None = None                  # device name: max_num_blocks from the memory plan
    memory_gib: float | None = None         # --fit: the device's memory (required for cpu)
    kv_cache_fraction: float | None = None  # --fit: see apar_rt.memory_plan
    gpu_memory_utilization: float | None = None  # --fit: see apar_rt.memory_plan
    check: bool = False
    force: bool = False

    def resolved_dtype(self) -> str:
        if self.dtype == "auto":
            return "float16" if self.backend == "tensorrt" else "float32"
        return self.dtype

    def quant_spec(self):
        from apar_rt.memory_plan import QuantSpec, default_symmetric
        sym = default_symmetric(self.quantize, self.backend) if self.symmetric is None else self.symmetric
        return QuantSpec(self.quantize, self.group_size, sym, self.quantize_lm_head)

    def buckets(self) -> list[int]:
        if self.batch_buckets:
            return sorted(set(self.batch_buckets))
        out, b = [], 1
        while b < self.max_batch_size:
            out.append(b)
            b *= 2
        return out + [self.max_batch_size]


@dataclass(slots=True)
class BuildResult:
    output: Path
    manifest: Manifest
    check: object | None = None             # a CheckReport with --check
    messages: list[str] = field(default_factory=list)


def validate(opts: BuildOptions) -> None:
    """Raise BuildError naming the flag for any impossible option (no files touched)."""
    if opts.backend not in ENGINE_BACKENDS:
        raise BuildError(f"--backend must be one of {', '.join(ENGINE_BACKENDS)}, got {opts.backend!r}")
    if opts.dtype not in DTYPES:
        raise BuildError(f"--dtype must be one of {', '.join(DTYPES)}, got {opts.dtype!r}")
    for flag, value in (("--max-batch-size", opts.max_batch_size), ("--max-num-tokens", opts.max_num_tokens),
                        ("--block-size", opts.block_size), ("--max-seq-len", opts.max_seq_len),
                        ("--max-num-blocks", opts.max_num_blocks)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BuildError(f"{flag} must be a positive integer, got {value!r}")
    if opts.max_num_blocks is not None and opts.max_num_blocks < 2:
        raise BuildError(f"--max-num-blocks must be >= 2 (block 0 is the null block), "
                         f"got {opts.max_num_blocks}")
    for b in opts.batch_buckets:
        if not isinstance(b, int) or b < 1:
            raise BuildError(f"--batch-buckets must hold positive integers, got {b!r}")
        if b > opts.max_batch_size:
            raise BuildError(f"--batch-buckets: bucket {b} is larger than --max-batch-size "
                             f"{opts.max_batch_size}")
    if opts.batch_buckets and max(opts.batch_buckets) != opts.max_batch_size:
        raise BuildError(f"--batch-buckets must include --max-batch-size {opts.max_batch_size} (largest "
                         f"given: {max(opts.batch_buckets)}), or no step could hold max-batch-size sequences")
    if opts.opset < 18:
        raise BuildError(f"opset must be >= 18, got {opts.opset}")
    dtype = opts.resolved_dtype()
    if opts.backend == "onnxruntime" and dtype == "bfloat16":
        raise BuildError("--dtype bfloat16 is not supported by the onnxruntime backend; "
                         "use float32 or float16")
    if opts.backend == "onnxruntime":
        for flag, value in (("--timing-cache", opts.timing_cache), ("--plugin", opts.plugin),
                            ("--gpu-targets", opts.gpu_targets)):
            if value:
                raise BuildError(f"{flag} applies to --backend tensorrt only")
    if opts.plugin and opts.plugin != "python" and not Path(opts.plugin).is_file():
        raise BuildError(f"--plugin {opts.plugin!r} does not exist; pass `python` (apar-rt's Python IPluginV3) "
                         f"or the path of a library that registers apar::TreePagedAttention version 1")
    if opts.max_draft_len is not None and opts.max_draft_len < 0:
        raise BuildError(f"--max-draft-len must be >= 0, got {opts.max_draft_len}")
    if opts.dry_run and opts.backend != "tensorrt":
        raise BuildError("--dry-run applies to --backend tensorrt only")
    if opts.max_prefill_batch < 1:
        raise BuildError(f"--max-prefill-batch must be a positive integer, got {opts.max_prefill_batch}")
    if opts.workspace_gib is not None and opts.workspace_gib <= 0:
        raise BuildError(f"--workspace must be positive, got {opts.workspace_gib}")
    if opts.quantize not in ("none", "int8", "int4"):
        raise BuildError(f"--quantize must be one of none, int8, int4, got {opts.quantize!r}")
    if opts.quantize != "none" and opts.check:
        raise BuildError("--check compares the engine with the unquantized torch model to float tolerance, which "
                         f"a --quantize {opts.quantize} engine is not meant to meet; build without --check (the "
                         "quantized engines' accuracy is measured against the unquantized engine by "
                         "apar_rt.bench.quantized.accuracy)")
    if opts.quantize == "none" and opts.quantize_lm_head:
        raise BuildError("--quantize-lm-head needs --quantize int8 or int4")
    if opts.fit and opts.max_num_blocks is not None:
        raise BuildError(f"--fit {opts.fit} sets --max-num-blocks from the memory plan; give one of them, "
                         f"not both (--max-num-blocks {opts.max_num_blocks})")
    if not opts.fit and (opts.memory_gib, opts.kv_cache_fraction, opts.gpu_memory_utilization) != (None,) * 3:
        raise BuildError("--memory-gib, --kv-cache-fraction and --gpu-memory-utilization apply with --fit DEVICE")


def fit_plan(opts: BuildOptions, cfg: ModelConfig, max_seq_len: int, activations: int | None = None):
    """The memory plan of `opts.fit` for this build (apar_rt.memory_plan), or BuildError naming the numbers.

    `activations`: a TensorRT build's estimate at its largest profile (default: the planner's own)."""
    from apar_rt import memory_plan as mp

    heads = mp.medusa_shape(opts.model) if opts.medusa is not False else (0, 0)
    try:
        return mp.plan(cfg, mp.get_device(opts.fit, opts.memory_gib), dtype=opts.resolved_dtype(),
                       quant=opts.quant_spec(),
                       block_size=opts.block_size, kv_cache_fraction=opts.kv_cache_fraction,
                       gpu_memory_utilization=opts.gpu_memory_utilization, max_batch_size=opts.max_batch_size,
                       max_num_tokens=opts.max_num_tokens, max_seq_len=max_seq_len, medusa=heads,
                       activations=activations)
    except mp.PlanError as e:
        raise BuildError(f"--fit {opts.fit}: {e}") from None


def _prepare_output(opts: BuildOptions) -> Path:
    out = Path(opts.output)
    if out.resolve() == Path(opts.model).resolve():
        raise BuildError(f"--output {str(out)!r} is the model folder itself; choose another folder")
    if out.exists():
        if not opts.force:
            raise BuildError(f"output folder {str(out)!r} already exists; pass --force to overwrite it")
        if not out.is_dir():
            raise BuildError(f"--output {str(out)!r} exists and is not a folder")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise BuildError(f"refusing to overwrite {str(out)!r}: it is not empty and is not an apar-rt "
                             f"engine folder (no {MANIFEST_NAME})")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _bars(progress: bool):
    """(stage bar, factory for TensorRT phase bars)."""
    from tqdm.auto import tqdm

    def factory(name, total):
        return tqdm(total=total, desc=f"  {name}", leave=False, disable=not progress)

    return tqdm(total=5, desc="build", unit="step", disable=not progress), factory


def build(opts: BuildOptions, *, progress: bool = True, log=print) -> BuildResult:
    """Build the engine folder described by `opts`.

    Raises:
        BuildError: bad options or an existing output folder.
        ModelLoadError: the model folder is missing or holds no supported model.
        TensorRTUnavailable: --backend tensorrt without a TensorRT library.
        PluginError: --plugin cannot be loaded or does not register apar::TreePagedAttention.
        RuntimeError: export, parsing or engine building failed.
    """
    validate(opts)
    cfg = ModelConfig.from_dir(opts.model)
    max_seq_len = opts.max_seq_len or cfg.max_position_embeddings
    if max_seq_len > cfg.max_position_embeddings:
        raise BuildError(f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if opts.quantize != "none":
        from apar_rt import memory_plan as mp
        try:
            mp.check_quant(cfg, opts.quant_spec())
        except mp.PlanError as e:
            raise BuildError(str(e)) from None
    messages: list[str] = []

    def say(msg: str) -> None:
        from tqdm.auto import tqdm

        messages.append(msg)
        with tqdm.external_write_mode(file=sys.stderr):
            log(msg)

    fitted, trt_plan = None, None
    if opts.backend == "tensorrt":   # the library, targets, profiles and memory: before any work
        trt_plan = _plan_tensorrt(opts, cfg, max_seq_len)
        fitted = trt_plan["fitted"]
        say(trt_plan["estimate"].report())
        say(trt_plan["limit_note"])
        for note in fitted.notes if fitted else ():
            say(f"note: {note}")
        if opts.dry_run:
            return BuildResult(Path(opts.output), None, None, messages)
    elif opts.fit:
        fitted = fit_plan(opts, cfg, max_seq_len)
    out = _prepare_output(opts)
    dtype = opts.resolved_dtype()
    buckets = opts.buckets()

    from apar_rt.model.tokenizer import control_tokens, load_tokenizer
    tokenizer = load_tokenizer(opts.model)
    control = control_tokens(tokenizer)

    stage, phase_bars = _bars(progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        stage.set_description("build: export ONNX")
        from apar_rt.export.onnx_export import export_onnx
        from apar_rt.medusa.heads import HEADS_DIRNAME, find_heads_dir
        heads_dir = find_heads_dir(opts.model) if opts.medusa is not False else None
        if opts.medusa and heads_dir is None:
            raise BuildError(f"--medusa: {opts.model!r} has no '{HEADS_DIRNAME}' folder of Medusa heads")
        exported = export_onnx(opts.model, tmp / ONNX_NAME, dtype=dtype, block_size=opts.block_size,
                               opset=opts.opset, external_data=opts.external_data, medusa_dir=heads_dir)
        if heads_dir is not None:   # their config marks the folder as having heads (weights: in the graph)
            (tmp / HEADS_DIRNAME).mkdir()
            shutil.copy(heads_dir / "config.json", tmp / HEADS_DIRNAME / "config.json")
        stage.update()
        heads = f", Medusa heads {exported.medusa['num_heads']}" if exported.medusa else ""
        say(f"exported {ONNX_NAME}: opset {exported.opset}, {exported.num_attention_nodes} "
            f"apar.TreePagedAttention nodes, dtype {dtype}{heads}")

        quantization = {}
        onnx_files = exported.files
        if opts.quantize != "none":
            stage.set_description(f"build: quantize {opts.quantize}")
            from apar_rt.build.quantize import quantize_onnx
            q = quantize_onnx(tmp / ONNX_NAME, opts.quant_spec(), target=opts.backend, vocab_size=cfg.vocab_size,
                              external_data=opts.external_data)
            quantization, onnx_files = q.record, q.files
            say(f"quantized {q.record['quantized_layers']} linear layers to {opts.quantize} "
                f"({q.record['format']}, group {opts.group_size}, "
                f"{'symmetric' if q.record['symmetric'] else 'asymmetric'}); kept in {dtype}: "
                f"{', '.join(q.record['unquantized'])}")

        stage.set_description("build: config and tokenizer")
        shutil.copy(Path(opts.model) / "config.json", tmp / "config.json")
        if (Path(opts.model) / "generation_config.json").is_file():
            shutil.copy(Path(opts.model) / "generation_config.json", tmp / "generation_config.json")
        tokenizer.save_pretrained(str(tmp))
        stage.update()

        engines = []
        max_num_blocks = fitted.num_blocks if fitted else (opts.max_num_blocks or 0)
        if fitted:
            say(f"--fit {opts.fit}: max_num_blocks {fitted.num_blocks} ({fitted.kv_tokens} tokens; weights "
                f"{fitted.weight_bytes} B, activations {fitted.activation_bytes} B, KV pool "
                f"{fitted.kv_pool_bytes} B)")
        if opts.backend == "onnxruntime":
            stage.set_description("build: load in onnxruntime")
            _try_onnxruntime(tmp / ONNX_NAME, dtype)
        else:
            stage.set_description("build: TensorRT engine")
            from apar_rt.build.tensorrt_builder import build_tensorrt_engine
            max_num_blocks = trt_plan["max_num_blocks"]
            ws = int(opts.workspace_gib * (1 << 30)) if opts.workspace_gib else None
            engines.append(build_tensorrt_engine(
                tmp / ONNX_NAME, tmp, manifest_fields=config_as_json(cfg), dtype=dtype,
                profiles=trt_plan["profiles"], block_size=opts.block_size,
                max_blocks_per_seq=-(-max_seq_len // opts.block_size), max_num_blocks=max_num_blocks,
                gpu_targets=trt_plan["targets"], timing_cache=opts.timing_cache, plugin=opts.plugin,
                workspace_bytes=ws, log=say, bar_factory=phase_bars))
        stage.update()

        stage.set_description("build: manifest")
        from apar_rt import __version__
        files = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
        manifest = Manifest(
            backend=opts.backend, dtype=dtype, model_config=config_as_json(cfg),
            control_tokens={"fork": control.fork, "child": control.child}, block_size=opts.block_size,
            max_batch_size=opts.max_batch_size, batch_buckets=buckets, max_num_tokens=opts.max_num_tokens,
            max_seq_len=max_seq_len, max_num_blocks=max_num_blocks,
            onnx={"file": ONNX_NAME, "opset": exported.opset,
                  "external_data": [str(f.relative_to(tmp)) for f in onnx_files[1:]],
                  "attention": exported.attrs.as_dict()},
            files=record_files(tmp, files), engines=engines, medusa=exported.medusa,
            memory_plan=fitted.to_dict() if fitted else {}, quantization=quantization,
            apar_rt_version=__version__,
            source_model=str(Path(opts.model).resolve()),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        write_manifest(tmp, manifest)
        stage.update()

        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        say(f"wrote {out} ({len(files)} files, buckets {buckets}, block size {opts.block_size})")

        report = None
        if opts.check:
            stage.set_description("build: check against torch")
            from apar_rt.build.check import run_check
            report = run_check(out, opts.model, manifest, log=say)
            say(report.summary())
        stage.update()
        return BuildResult(out, manifest, report, messages)
    finally:
        stage.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _plan_tensorrt(opts: BuildOptions, cfg: ModelConfig, max_seq_len: int) -> dict:
    """The TensorRT library, GPU targets, profiles, pool and device-memory estimate, checked before any work.

    The pool is --max-num-blocks, or with --fit DEVICE what the memory planner leaves after the weights and
    this plan's largest-profile activations. The target memory is --fit's device, else (full TensorRT)
    the build GPU; an estimate over it is refused.

    Raises:
        TensorRTUnavailable: no TensorRT library.
        BuildError: a GPU target the library cannot build for, an input over TensorRT's size limit, or an
            estimate over the target memory (naming it).
    """
    from apar_rt import memory_plan as mp
    from apar_rt.build.tensorrt_builder import _device_cc, check_input_sizes, estimate_memory, plan_profiles
    from apar_rt.trt import library

    lib = library.load()
    cc, gpu = _device_cc()
    try:
        targets = library.resolve_targets(lib, opts.gpu_targets, cc)
        if opts.quantize != "none":
            from apar_rt.build.quantize import check_tensorrt_support
            check_tensorrt_support(lib.name, lib.version, opts.quant_spec())
    except ValueError as e:
        raise BuildError(str(e)) from None
    medusa = mp.medusa_shape(opts.model) if opts.medusa is not False else (0, 0)
    draft = opts.max_draft_len if opts.max_draft_len is not None else (63 if medusa[0] else 0)
    profiles = plan_profiles(opts.buckets(), opts.max_num_tokens, draft + 1, opts.max_prefill_batch)
    dtype = opts.resolved_dtype()

    def estimate(num_blocks: int):
        return estimate_memory(cfg, dtype, profiles, max_seq_len=max_seq_len, block_size=opts.block_size,
                               num_blocks=num_blocks, fused_attention=opts.plugin is not None, medusa=medusa)

    fitted = None
    if opts.fit:
        fitted = fit_plan(opts, cfg, max_seq_len, activations=estimate(0).activation_bytes)
        num_blocks, limit = fitted.num_blocks, fitted.usable_bytes
        where = f"--fit {opts.fit}: usable {fitted.usable_bytes / (1 << 30):.2f} GiB"
    else:
        num_blocks = opts.max_num_blocks or DEFAULT_TRT_MAX_NUM_BLOCKS
        limit, where = None, "no target memory given (--fit DEVICE checks one)"
        if not lib.rtx and gpu is not None:
            import torch
            limit = torch.cuda.get_device_properties(0).total_memory
            where = f"the build GPU {gpu}: {limit / (1 << 30):.2f} GiB"
    try:
        check_input_sizes(profiles, config_as_json(cfg), block_size=opts.block_size, max_num_blocks=num_blocks)
    except ValueError as e:
        raise BuildError(str(e)) from None
    est = estimate(num_blocks)
    if limit is not None and est.total_bytes > limit:
        raise BuildError(f"{est.report()}; this exceeds {where}. Lower --max-num-blocks, --max-num-tokens or "
                         f"--max-prefill-batch" + ("" if opts.plugin else ", or use --plugin (no score tensor)"))
    return {"library": lib, "targets": targets, "profiles": profiles, "max_num_blocks": num_blocks,
            "estimate": est, "fitted": fitted, "limit_note": f"target memory: {where}"}


def _try_onnxruntime(path: Path, dtype: str) -> None:
    """Load the graph once so that an unrunnable dtype fails the build, not the first request."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime's own exception types
        raise BuildError(f"onnxruntime cannot load the exported {dtype} graph: {e}") from None


__all__ = ["BuildError", "BuildOptions", "BuildResult", "ModelLoadError", "build", "validate"]
