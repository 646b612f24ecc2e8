"""`manifest.json`: what an engine folder holds, and the checks made when loading one.

An engine folder (written by `apar-rt build`) holds:
    manifest.json                 this record
    config.json                   the checkpoint's HF config, copied
    tokenizer files               saved from the checkpoint's tokenizer
    model.onnx (+ model.onnx.data) the step graph with apar.TreePagedAttention (every backend)
    model.plan                    TensorRT engine, one optimization profile per batch bucket
    medusa/config.json            when the graph outputs Medusa heads' logits (their weights are in the graph)

Loading verifies the format and apar-rt versions, the sha256 and size of every recorded file,
and that config.json still describes the recorded model; any mismatch is an EngineLoadError
whose message names the file or field. Every file a loader opens must be recorded and lie
inside the folder; files the manifest does not record are ignored (the tokenizer is loaded from
the recorded files only). The hashes detect corruption, not a deliberate edit: whoever can
write the folder can re-hash it, so sign or checksum the folder if that matters.
Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from apar_rt.config import ModelConfig, ModelLoadError

MANIFEST_NAME = "manifest.json"
FORMAT = "apar-rt-engine"
FORMAT_VERSION = 1
ONNX_NAME = "model.onnx"
ENGINE_BACKENDS = ("onnxruntime", "tensorrt")


class EngineLoadError(ModelLoadError):
    """An engine folder that cannot be loaded: missing, corrupt, or built for something else."""


@dataclass(slots=True)
class Manifest:
    """The record of one engine folder (a JSON object in manifest.json)."""

    backend: str                      # what it was built for: "onnxruntime" or "tensorrt"
    dtype: str                        # weights/KV dtype of the graph: float32, float16, bfloat16
    model_config: dict                # ModelConfig fields, as JSON
    control_tokens: dict              # {"fork": id or None, "child": id or None}
    block_size: int                   # KV block size baked into the attention nodes
    max_batch_size: int               # most sequences in one step
    batch_buckets: list[int]          # fixed batch sizes (TensorRT profiles); steps pad up to one
    max_num_tokens: int               # most new tokens in one step
    max_seq_len: int                  # longest context of one sequence
    max_num_blocks: int               # largest KV pool (blocks, null block included); 0: no limit
    onnx: dict                        # {"file", "opset", "inputs", "outputs", "attention": {attrs}}
    files: dict = field(default_factory=dict)    # relative path -> {"sha256", "bytes"}
    engines: list = field(default_factory=list)  # TensorRT: [{"file", "profiles": [...], ...}]
    medusa: dict = field(default_factory=dict)   # {"num_heads", "num_layers"} when the graph has heads
    memory_plan: dict = field(default_factory=dict)  # with --fit: apar_rt.memory_plan.MemoryPlan.to_dict()
    quantization: dict = field(default_factory=dict)  # with --quantize: {"scheme", "bits", "group_size",
    #   "symmetric", "format" (MatMulNBits | DequantizeLinear), "quantizer", "quantized_layers", "unquantized"}
    apar_rt_version: str = ""
    source_model: str = ""
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_seq_len // self.block_size)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def record_files(root: str | Path, names) -> dict:
    """{relative name: {"sha256", "bytes"}} for files under `root`."""
    root = Path(root)
    return {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in sorted(names)}


def config_as_json(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def engine_record_digest(record: dict) -> str:
    """sha256 of a TensorRT engine record (library, targets, profiles, plugin...) without its own digest.

    The plan's bytes are covered by `files`; this covers what the manifest says about the plan, so an
    edited record (say, GPU targets widened by hand) is refused like an edited plan.
    """
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    path.write_text(manifest.to_json() + "\n")
    return path


def is_engine_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def _compatible_version(built: str, running: str) -> bool:
    """Same major.minor: engines are rebuilt across minor releases (0.x: across any minor)."""
    return built.split(".")[:2] == running.split(".")[:2]


def read_manifest(root: str | Path) -> Manifest:
    """Parse manifest.json (no file hashing); EngineLoadError on anything malformed."""
    from apar_rt import __version__

    root = Path(root)
    if not root.exists():
        raise EngineLoadError(f"engine folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise EngineLoadError(f"engine path {str(root)!r} is not a folder")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise EngineLoadError(f"{str(root)!r} is not an apar-rt engine folder: it has no {MANIFEST_NAME} "
                              f"(build one with `apar-rt build --model MODEL --output {root}`)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise EngineLoadError(f"{path} is not a JSON object")
    if d.get("format") != FORMAT:
        raise EngineLoadError(f"{path} is not an apar-rt engine manifest (format {d.get('format')!r} "
                              f"instead of {FORMAT!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise EngineLoadError(f"{path} has format_version {d.get('format_version')!r}; this apar-rt reads "
                              f"format_version {FORMAT_VERSION}: rebuild the engine")
    built = str(d.get("apar_rt_version", ""))
    if not _compatible_version(built, __version__):
        raise EngineLoadError(f"{path}: the engine was built by apar-rt {built or '(unknown)'}, but this is "
                              f"apar-rt {__version__}; rebuild it with `apar-rt build`")
    known = set(Manifest.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise EngineLoadError(f"{path} has unknown fields: {', '.join(sorted(unknown))}")
    try:
        m = Manifest(**d)
    except TypeError as e:
        raise EngineLoadError(f"{path} lacks required fields: {e}") from None
    if m.backend not in ENGINE_BACKENDS:
        raise EngineLoadError(f"{path}: unknown backend {m.backend!r}; expected one of "
                              f"{', '.join(ENGINE_BACKENDS)}")
    return m


def verify_engine_dir(root: str | Path, *, backend: str | None = None, check_hashes: bool = True) -> Manifest:
    """The folder's manifest, after checking its files, config and (optionally) backend.

    Args:
        root: the engine folder.
        backend: the backend about to load it; "tensorrt" needs TensorRT engines in it.
        check_hashes: compare every recorded file's sha256 (its size is always compared).

    Raises:
        EngineLoadError: naming the missing/corrupt file or the mismatched field.
    """
    root = Path(root)
    m = read_manifest(root)
    if ONNX_NAME not in m.files or "config.json" not in m.files:
        raise EngineLoadError(f"{root / MANIFEST_NAME} does not record {ONNX_NAME} and config.json")
    real_root = root.resolve()
    for name in m.files:
        if not _inside(real_root, root / name):
            raise EngineLoadError(f"{root / MANIFEST_NAME} records {name!r}, which is not inside the engine folder")
    named = [("onnx.file", m.onnx.get("file", ONNX_NAME))]
    named += [("onnx.external_data", f) for f in m.onnx.get("external_data") or ()]
    named += [(f"engines[{i}].file", e.get("file")) for i, e in enumerate(m.engines)]
    for field_name, name in named:   # the loaders open only files whose hash was checked
        if name not in m.files:
            raise EngineLoadError(f"{root / MANIFEST_NAME}: {field_name} names {name!r}, which the manifest "
                                  "does not record (hash); rebuild the engine")
    for name, rec in m.files.items():
        f = root / name
        if not f.is_file():
            raise EngineLoadError(f"engine file {name} is missing from {str(root)!r}")
        size = f.stat().st_size
        if size != rec.get("bytes"):
            raise EngineLoadError(f"engine file {name} is corrupt: it has {size} bytes, the manifest records "
                                  f"{rec.get('bytes')}")
        if check_hashes:
            digest = sha256_file(f)
            if digest != rec.get("sha256"):
                raise EngineLoadError(f"engine file {name} is corrupt: sha256 {digest[:16]}... does not "
                                      f"match the manifest's {str(rec.get('sha256'))[:16]}...; "
                                      f"rebuild the engine")
    for rec in m.engines:
        if not isinstance(rec, dict) or rec.get("record_sha256") != engine_record_digest(rec):
            name = rec.get("file", "?") if isinstance(rec, dict) else "?"
            raise EngineLoadError(f"{root / MANIFEST_NAME}: the record of engine {name} has been edited since the "
                                  f"build (its digest does not match); rebuild the engine")
    cfg = config_as_json(ModelConfig.from_dir(root))
    if cfg != m.model_config:
        diff = sorted(k for k in set(cfg) | set(m.model_config) if cfg.get(k) != m.model_config.get(k))
        raise EngineLoadError(f"{root / 'config.json'} does not match the manifest's model_config "
                              f"(fields differ: {', '.join(diff)}); rebuild the engine")
    if backend == "tensorrt" and not m.engines:
        raise EngineLoadError(f"{str(root)!r} was built for {m.backend} and holds no TensorRT engine; "
                              f"rebuild it with `apar-rt build --backend tensorrt`")
    if backend is not None and backend not in ENGINE_BACKENDS:
        raise EngineLoadError(f"{str(root)!r} is an engine folder; load it with --backend "
                              f"{' or '.join(ENGINE_BACKENDS)} (backend {backend!r} needs a Hugging Face "
                              f"model folder)")
    return m


def _inside(real_root: Path, path: Path) -> bool:
    """Whether `path` (symlinks resolved) lies inside the folder `real_root` (already resolved)."""
    try:
        return path.resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):   # a symlink loop
        return False


def engine_settings(root: str | Path, backend: str, engine_kwargs: dict) -> tuple[dict, object]:
    """Engine kwargs fitted to an engine folder's limits, and its control tokens.

    The block size is the engine's (a different explicit one is an error); max_num_seqs,
    max_num_tokens and max_model_len are capped at the engine's limits.

    Raises:
        EngineLoadError: the folder's manifest cannot be read, or `backend` cannot load it.
        ValueError: an engine kwarg that conflicts with how the engine was built.
    """
    from apar_rt.apar import ControlTokens

    m = read_manifest(root)
    if backend not in ENGINE_BACKENDS:
        raise EngineLoadError(f"{str(root)!r} is an engine folder; load it with --backend "
                              f"{' or '.join(ENGINE_BACKENDS)} (backend {backend!r} needs a Hugging Face "
                              f"model folder)")
    kw = dict(engine_kwargs)
    bs = kw.get("block_size")
    if bs is not None and bs != m.block_size:
        raise ValueError(f"block_size {bs} differs from the engine's block size {m.block_size} (fixed at "
                         f"build time); pass --block-size {m.block_size} or rebuild")
    kw["block_size"] = m.block_size
    kw["max_num_seqs"] = min(kw.get("max_num_seqs") or m.max_batch_size, m.max_batch_size)
    kw["max_num_tokens"] = min(kw.get("max_num_tokens") or m.max_num_tokens, m.max_num_tokens)
    kw["max_model_len"] = min(kw.get("max_model_len") or m.max_seq_len, m.max_seq_len)
    nb = kw.get("num_blocks")
    if nb is not None and m.max_num_blocks and nb > m.max_num_blocks:
        raise ValueError(f"num_blocks {nb} exceeds the engine's max_num_blocks {m.max_num_blocks} "
                         f"(fixed at build time); pass a smaller --num-blocks or rebuild")
    ct = m.control_tokens or {}
    return kw, ControlTokens(ct.get("fork"), ct.get("child"))
