"""How much a device holds: weights, activation workspace, KV pool, sequences x context.

One module, used by `apar-rt plan`, `apar-rt build --fit DEVICE` (which sets --max-num-blocks)
and anything else that sizes a KV pool. Pure Python: it reads a model's shape (`ModelConfig`)
and does arithmetic, so it plans a 7B model on a laptop with no weights present.

The memory budget (the same two knobs as vLLM and TensorRT-LLM):

    usable      = device memory x gpu_memory_utilization - reserved
    free        = usable - weights - activation workspace
    KV pool     = free x kv_cache_fraction
    num_blocks  = KV pool // KV bytes per block + 1         (block 0 is the reserved null block)

- `gpu_memory_utilization` (vLLM's `--gpu-memory-utilization`): the share of the device the
  engine may take in all, weights and activations included. Default 1.0.
- `kv_cache_fraction` (TensorRT-LLM's `kv_cache_free_gpu_mem_fraction`): the share of what is
  left after the weights and the activations that the KV pool takes. Default 0.9, or 1.0 when
  `gpu_memory_utilization` is given (so `--gpu-memory-utilization 0.9` means what it means in vLLM).
- `reserved`: per device, memory the engine never gets: the OS on Jetson's shared memory, the
  CUDA context and libraries on a GPU, the Python process (torch, onnxruntime, tokenizer) on a CPU.

Weight bytes are exact for the ONNX graph `apar-rt build` writes (its initializers, byte for
byte, including Medusa heads), and for the `MatMulNBits` / blocked-`DequantizeLinear` layouts of
`--quantize int8|int4`. The activation workspace is an upper estimate of the ONNX graph's
intermediates at the largest profile (see `activation_bytes`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from apar_rt.config import ModelConfig

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
QUANTIZATIONS = ("none", "int8", "int4")
QUANT_BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
DEFAULT_KV_CACHE_FRACTION = 0.9
# Branches per request in "typical APAR branching": the demo model's held-out structured prompts
# average 143 items over 36 prompts (samples/models/apar-tiny/eval.json), i.e. ~4 children each.
DEFAULT_APAR_BRANCHES = 4
# Resident memory of an `apar-rt serve` process on CPU before any weights or KV pool (Python,
# onnxruntime, tokenizer, HTTP server), measured on this project's CI machine. An onnxruntime engine
# is served without torch since issue 12 (was 340 MiB with torch; the torch backend still adds it).
CPU_RUNTIME_BYTES = 96 << 20


def default_symmetric(scheme: str, backend: str = "onnxruntime") -> bool:
    """Measured on the demo model's held-out prompts (tests/test_quantize.py; onnxruntime's CPU,
    multiplying in int8): int8 symmetric (43/44 greedy answers equal to fp32 vs 40/44 asymmetric),
    int4 asymmetric (35/44 vs 33/44); with float32 compute, 43 vs 42 and 37 vs 33.
    TensorRT's weight-only path takes no zero point: always symmetric there."""
    return backend == "tensorrt" or scheme != "int4"


class PlanError(ValueError):
    """A plan that cannot be made (bad option, or the model does not fit); the message names the numbers."""


@dataclass(frozen=True, slots=True)
class Device:
    """A deployment target."""

    name: str                 # the --device name
    memory_bytes: int         # total memory the device has (GPU memory, or the shared DRAM on Jetson)
    reserved_bytes: int       # never available to the engine (OS, CUDA context, runtime libraries)
    unified: bool             # CPU and GPU share the memory (Jetson, CPU)
    description: str


def _dev(name: str, gib: float, reserved_gib: float, unified: bool, description: str) -> Device:
    return Device(name, int(gib * GIB), int(reserved_gib * GIB), unified, description)


# Memory as the device reports it; reserves are estimates (say --memory-gib to override the total).
DEVICES: dict[str, Device] = {d.name: d for d in (
    _dev("orin-nano-8gb", 7.4, 1.5, True, "Jetson Orin Nano 8 GB (shared LPDDR5; ~1.5 GiB for JetPack "
         "without a desktop, CUDA and TensorRT)"),
    _dev("orin-nx-16gb", 15.3, 2.0, True, "Jetson Orin NX 16 GB (shared LPDDR5)"),
    _dev("agx-orin-64gb", 61.4, 3.0, True, "Jetson AGX Orin 64 GB (shared LPDDR5)"),
    _dev("rtx-4090", 23.99, 0.6, False, "GeForce RTX 4090 24 GB (CUDA context and libraries ~0.6 GiB)"),
    _dev("h100-80gb", 79.65, 0.8, False, "H100 80 GB"),
    _dev("h200", 139.8, 0.8, False, "H200 141 GB"),
)}
CPU_DEVICE = "cpu"
DEVICE_NAMES = (*DEVICES, CPU_DEVICE)


def get_device(name: str, memory_gib: float | None = None) -> Device:
    """The named device; `memory_gib` overrides its memory (and is required for "cpu").

    Raises:
        PlanError: an unknown name, or "cpu" without a memory size.
    """
    if memory_gib is not None and not memory_gib > 0:
        raise PlanError(f"--memory-gib must be positive, got {memory_gib}")
    if name == CPU_DEVICE:
        if memory_gib is None:
            raise PlanError("--device cpu needs --memory-gib N (the memory apar-rt may use)")
        return Device(CPU_DEVICE, int(memory_gib * GIB), CPU_RUNTIME_BYTES, True,
                      f"CPU with {memory_gib:g} GiB (apar-rt serve process ~{CPU_RUNTIME_BYTES / GIB:.2f} GiB)")
    if name not in DEVICES:
        raise PlanError(f"unknown device {name!r}; known: {', '.join(DEVICE_NAMES)} "
                        f"(or give --memory-gib with any of them)")
    d = DEVICES[name]
    if memory_gib is None:
        return d
    return Device(d.name, int(memory_gib * GIB), d.reserved_bytes, d.unified,
                  f"{d.description}, memory set to {memory_gib:g} GiB")


# ---- weights ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class QuantSpec:
    """Weight-only quantization of the linear layers (embeddings, norms, LM head stay in `dtype`)."""

    scheme: str = "none"              # none | int8 | int4
    group_size: int = DEFAULT_GROUP_SIZE  # input features per scale (blocked along the input axis)
    symmetric: bool = True            # False: a zero point per group as well (see default_symmetric)
    quantize_lm_head: bool = False    # also the LM head (and the Medusa heads' vocabulary projections)

    @property
    def bits(self) -> int:
        return QUANT_BITS.get(self.scheme, 0)


def quantized_linear_bytes(k: int, n: int, spec: QuantSpec, scale_bytes: int) -> int:
    """Bytes of one K x N weight (K input features) stored as `spec` in MatMulNBits' layout.

    B is uint8 [N, ceil(K/g), g*bits/8]; scales [N * ceil(K/g)] in the activation dtype; the
    asymmetric form adds uint8 zero points [N * ceil(ceil(K/g) * bits / 8)]. The blocked
    DequantizeLinear form (TensorRT) holds the same bytes.
    """
    groups = -(-k // spec.group_size)
    total = n * groups * spec.group_size * spec.bits // 8 + n * groups * scale_bytes
    if not spec.symmetric:
        total += n * (-(-groups * spec.bits // 8))
    return total


def _linears(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, in, out) of one decoder layer's linear layers."""
    h, d = cfg.hidden_size, cfg.head_dim
    return [("q_proj", h, cfg.num_attention_heads * d), ("k_proj", h, cfg.num_key_value_heads * d),
            ("v_proj", h, cfg.num_key_value_heads * d), ("o_proj", cfg.num_attention_heads * d, h),
            ("gate_proj", h, cfg.intermediate_size), ("up_proj", h, cfg.intermediate_size),
            ("down_proj", cfg.intermediate_size, h)]


def weight_breakdown(cfg: ModelConfig, dtype: str, quant: QuantSpec = QuantSpec(),
                     medusa: tuple[int, int] = (0, 0)) -> dict[str, int]:
    """Bytes of the engine's weights by part: embeddings, layers (linear + norms), final norm,
    lm_head, medusa. `medusa` is (num_heads, num_layers per head).

    Matches the initializers of the exported ONNX graph exactly (a tied LM head is stored
    separately there, as the embedding's transpose).
    """
    e = DTYPE_BYTES[dtype]
    h, v = cfg.hidden_size, cfg.vocab_size

    def linear(k: int, n: int, quantized: bool) -> int:
        return quantized_linear_bytes(k, n, quant, e) if quantized and quant.bits else k * n * e

    layer = sum(linear(k, n, True) for _, k, n in _linears(cfg)) + 2 * h * e
    if cfg.attention_bias:
        layer += (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim * e
    if cfg.mlp_bias:
        layer += (2 * cfg.intermediate_size + h) * e
    heads, head_layers = medusa
    out = {"embeddings": v * h * e, "layers": cfg.num_hidden_layers * layer, "final_norm": h * e,
           "lm_head": linear(h, v, quant.quantize_lm_head)}
    if heads:
        out["medusa"] = heads * (head_layers * (linear(h, h, True) + h * e) + linear(h, v, quant.quantize_lm_head))
    return out


# ---- KV and activations ------------------------------------------------------------------------

def kv_bytes_per_block(cfg: ModelConfig, block_size: int, kv_dtype: str) -> int:
    """K and V of `block_size` tokens in every layer."""
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * DTYPE_BYTES[kv_dtype]


def activation_bytes(cfg: ModelConfig, dtype: str, *, max_batch_size: int, max_num_tokens: int,
                     max_seq_len: int, block_size: int, medusa_heads: int = 0, max_q: int | None = None,
                     fused_attention: bool = False) -> int:
    """Upper estimate of the step graph's live intermediates at the largest profile.

    One layer's tensors are live at a time (T = max_num_tokens new tokens, B = max_batch_size
    sequences, S = max_seq_len padded to blocks): hidden states and residuals (4 T*H), q/k/v,
    the MLP (3 T*I), the K/V gathered through the block tables (2 B*S*Hkv*D), the float32
    scores and softmax of one sequence's full prefill chunk (2 Hq*T*S*4 bytes: the ONNX
    function's unfused attention), plus every layer's new K/V outputs and the float32 logits
    of B rows (and of each Medusa head).

    A TensorRT profile gives `max_q` (the most new tokens of one sequence): the function pads every
    sequence to it, so its scores and softmax are 2 B*Hq*max_q*(S+max_q)*4 bytes instead.
    `fused_attention` (the TreePagedAttention plugin's kernel) materializes neither the scores nor
    the K/V gathered through the block tables.
    """
    e = DTYPE_BYTES[dtype]
    T, B = max_num_tokens, max_batch_size
    S = -(-max_seq_len // block_size) * block_size
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    scores = 2 * hq * T * S * 4 if max_q is None else 2 * B * hq * max_q * (S + max_q) * 4
    gathered = 2 * B * S * hkv * d * e
    layer = (4 * T * h + T * (hq + 2 * hkv) * d + 3 * T * i) * e + (0 if fused_attention else scores + gathered)
    outputs = 2 * cfg.num_hidden_layers * T * hkv * d * e + B * cfg.vocab_size * 4 * (1 + medusa_heads)
    return layer + outputs


# ---- the plan ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """What a device holds for one model and engine shape (all sizes in bytes)."""

    device: str                    # device name
    memory_bytes: int              # the device's memory
    reserved_bytes: int            # never the engine's (OS, CUDA context, runtime)
    usable_bytes: int              # memory x gpu_memory_utilization - reserved
    dtype: str                     # weights/KV dtype
    quantization: str              # none | int8 | int4
    group_size: int                # input features per scale (quantized only)
    weight_bytes: int              # all weights
    weights: dict                  # by part (embeddings, layers, final_norm, lm_head, medusa)
    activation_bytes: int          # workspace at the largest profile
    kv_cache_fraction: float       # share of (usable - weights - activations) given to the KV pool
    gpu_memory_utilization: float  # share of the device the engine takes in all
    block_size: int                # tokens per KV block
    kv_bytes_per_block: int        # K+V of one block, all layers
    num_blocks: int                # KV pool size, null block included (--max-num-blocks / --num-blocks)
    kv_pool_bytes: int             # num_blocks x kv_bytes_per_block
    kv_tokens: int                 # tokens the pool holds ((num_blocks - 1) x block_size)
    max_batch_size: int            # most sequences (APAR branches included) in a step
    max_num_tokens: int            # most new tokens in a step
    context: int                   # tokens per sequence for the two counts below
    ar_sequences: int              # AR requests of `context` tokens the pool holds at once
    apar_branches: int             # children per request assumed for APAR
    apar_requests: int             # APAR requests of `context` tokens (prompt + all branches) the pool holds
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        """Reserved + weights + activations + KV pool: the peak resident memory predicted."""
        return self.reserved_bytes + self.weight_bytes + self.activation_bytes + self.kv_pool_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["total_bytes"] = self.total_bytes
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        """A human-readable summary."""
        g = _size
        q = self.quantization if self.quantization == "none" else f"{self.quantization} (group {self.group_size})"
        rows = [(f"device {self.device}: {g(self.memory_bytes).strip()}, usable {g(self.usable_bytes).strip()} "
                 f"(x{self.gpu_memory_utilization:g} utilization, {g(self.reserved_bytes).strip()} reserved)"),
                f"dtype {self.dtype}, quantization {q}",
                f"  weights              {g(self.weight_bytes)}"]
        rows += [f"    {k:<18} {g(v)}" for k, v in self.weights.items()]
        at_once_apar = min(self.apar_requests, self.max_batch_size // (1 + self.apar_branches))
        rows += [(f"  activations          {g(self.activation_bytes)}  (batch {self.max_batch_size}, "
                  f"{self.max_num_tokens} tokens/step)"),
                 f"  KV pool              {g(self.kv_pool_bytes)}  ({self.kv_cache_fraction:g} of the rest)",
                 f"  total                {g(self.total_bytes)}",
                 (f"KV: {self.kv_bytes_per_block} bytes/block of {self.block_size} tokens, "
                  f"{self.num_blocks} blocks (null included), {self.kv_tokens} tokens"),
                 (f"holds at {self.context} tokens each: {self.ar_sequences} AR sequences, "
                  f"{self.apar_requests} APAR requests (1 + {self.apar_branches} branches each)"),
                 (f"a step runs at most {self.max_batch_size} sequences: "
                  f"{min(self.ar_sequences, self.max_batch_size)} AR / {at_once_apar} APAR requests at once")]
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def _size(b: int) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= GIB else f"{b / (1 << 20):8.2f} MiB"


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def plan(cfg: ModelConfig, device: Device, *, dtype: str = "float16", quant: QuantSpec = QuantSpec(),
         block_size: int = 16, kv_cache_fraction: float | None = None,
         gpu_memory_utilization: float | None = None, max_batch_size: int = 8, max_num_tokens: int = 2048,
         max_seq_len: int | None = None, context: int | None = None,
         apar_branches: int = DEFAULT_APAR_BRANCHES, medusa: tuple[int, int] = (0, 0),
         activations: int | None = None) -> MemoryPlan:
    """Plan `cfg` on `device`.

    Args:
        cfg: the model's shape.
        device: from `get_device`.
        dtype: weights, activations and KV dtype.
        quant: weight-only quantization of the linear layers.
        block_size: tokens per KV block.
        kv_cache_fraction: share of the memory left after weights and activations that the KV pool
            takes (default 0.9, or 1.0 when gpu_memory_utilization is given).
        gpu_memory_utilization: share of the device the engine takes in all (default 1.0).
        max_batch_size, max_num_tokens: the engine's largest step.
        max_seq_len: longest sequence (default: the model's max_position_embeddings).
        context: tokens per sequence for the sequences x context counts (default: max_seq_len).
        apar_branches: children per APAR request.
        medusa: (num_heads, num_layers per head), (0, 0) without Medusa heads.
        activations: the activation workspace when the caller knows it better (a TensorRT build's
            largest profile, apar_rt.build.tensorrt_builder.estimate_memory); default `activation_bytes`.

    Returns:
        The MemoryPlan.

    Raises:
        PlanError: a bad option, or weights + activations do not fit (naming the bytes needed at
            each quantization and what the device has).
    """
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    check_quant(cfg, quant)
    for name, val in (("block_size", block_size), ("max_batch_size", max_batch_size),
                      ("max_num_tokens", max_num_tokens), ("max_seq_len", max_seq_len), ("context", context)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise PlanError(f"{name} must be a positive integer, got {val!r}")
    if apar_branches < 0:
        raise PlanError(f"apar_branches must be >= 0, got {apar_branches}")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise PlanError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    if kv_cache_fraction is not None and not 0 < kv_cache_fraction <= 1:
        raise PlanError(f"--kv-cache-fraction must be in (0, 1], got {kv_cache_fraction}")
    util = 1.0 if gpu_memory_utilization is None else gpu_memory_utilization
    frac = kv_cache_fraction if kv_cache_fraction is not None else (
        DEFAULT_KV_CACHE_FRACTION if gpu_memory_utilization is None else 1.0)
    max_seq_len = max_seq_len or cfg.max_position_embeddings
    context = min(context or max_seq_len, max_seq_len)

    weights = weight_breakdown(cfg, dtype, quant, medusa)
    wbytes = sum(weights.values())
    act = activations if activations is not None else activation_bytes(
        cfg, dtype, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
        block_size=block_size, medusa_heads=medusa[0])
    usable = int(device.memory_bytes * util) - device.reserved_bytes
    per_block = kv_bytes_per_block(cfg, block_size, dtype)
    free = usable - wbytes - act
    if free < 2 * per_block:
        raise PlanError(_does_not_fit(cfg, device, dtype, quant, medusa, usable, wbytes, act, per_block))
    num_blocks = int(free * frac) // per_block + 1
    notes = []
    seq_blocks = _blocks_for(context, block_size)
    if num_blocks - 1 < seq_blocks:
        notes.append(f"the pool ({(num_blocks - 1) * block_size} tokens) holds less than one sequence of "
                     f"{context} tokens: lower --max-seq-len/--context"
                     + ("" if quant.scheme == "int4" else " or quantize"))
    # Memory alone decides these counts; a step runs at most max_batch_size sequences of them.
    ar = (num_blocks - 1) // seq_blocks
    # An APAR request's tokens (prompt + every branch) total `context`; each branch adds at most a
    # copied partial block at its fork and a partial last block.
    apar = (num_blocks - 1) // (seq_blocks + 2 * apar_branches)
    if max_batch_size < 1 + apar_branches:
        notes.append(f"max_batch_size {max_batch_size} runs fewer than one request's 1 + {apar_branches} "
                     f"branches at once: branches wait for a slot")
    return MemoryPlan(
        device=device.name, memory_bytes=device.memory_bytes, reserved_bytes=device.reserved_bytes,
        usable_bytes=usable, dtype=dtype, quantization=quant.scheme,
        group_size=quant.group_size if quant.bits else 0, weight_bytes=wbytes, weights=weights,
        activation_bytes=act, kv_cache_fraction=frac, gpu_memory_utilization=util, block_size=block_size,
        kv_bytes_per_block=per_block, num_blocks=num_blocks, kv_pool_bytes=num_blocks * per_block,
        kv_tokens=(num_blocks - 1) * block_size, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
        context=context, ar_sequences=ar, apar_branches=apar_branches, apar_requests=apar, notes=tuple(notes))


def check_quant(cfg: ModelConfig, quant: QuantSpec) -> None:
    """PlanError unless `quant` applies to `cfg` (the group size must divide every linear's input)."""
    if quant.scheme not in QUANTIZATIONS:
        raise PlanError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quant.scheme!r}")
    if not quant.bits:
        return
    g = quant.group_size
    if not isinstance(g, int) or g < 16 or g & (g - 1):
        raise PlanError(f"--group-size must be a power of two >= 16 (MatMulNBits' block sizes), got {g!r}")
    for name, k, _ in _linears(cfg):
        if k % g:
            raise PlanError(f"--group-size {g} does not divide {name}'s {k} input features "
                            f"(hidden_size {cfg.hidden_size}, intermediate_size {cfg.intermediate_size}); "
                            f"choose a group size that divides {k}")


def _does_not_fit(cfg, device, dtype, quant, medusa, usable, wbytes, act, per_block) -> str:
    def g(b: int) -> str:
        return _size(b).strip()

    need = {s: sum(weight_breakdown(cfg, dtype, QuantSpec(s, quant.group_size, quant.symmetric,
                                                          quant.quantize_lm_head), medusa).values())
            for s in QUANTIZATIONS}
    at = ", ".join(f"{g(b)} at {dtype if s == 'none' else s}" for s, b in need.items())
    msg = (f"the model does not fit {device.name}: weights {g(wbytes)} ({quant.scheme}) + activations "
           f"{g(act)} + two KV blocks {g(2 * per_block)} exceed the usable {g(usable)} "
           f"({g(device.memory_bytes)} - {g(device.reserved_bytes)} reserved). Weights need {at}.")
    if need["int4"] + act + 2 * per_block > usable:
        msg += " It does not fit even at int4"
        msg += ("; lower --max-num-tokens/--max-batch-size to shrink the activations" if
                need["int4"] < usable else "; choose a device with more memory") + "."
    else:
        msg += " Pass --quantize int4 (or int8 if it fits), or lower --max-num-tokens."
    return msg


def plan_from_folder(path: str, device: Device, **kw) -> MemoryPlan:
    """`plan` for a model folder, an engine folder (its manifest fills dtype, quantization, block
    size and limits unless given in `kw`) or a config.json file.

    Raises:
        ModelLoadError: the path holds no model config.
        PlanError: as `plan`.
    """
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        cfg = ModelConfig.from_hf_dict(json.loads(p.read_text()))
        return plan(cfg, device, **kw)
    from apar_rt.build.manifest import is_engine_dir, read_manifest
    if is_engine_dir(p):
        m = read_manifest(p)
        cfg = ModelConfig.from_dir(p)
        q = getattr(m, "quantization", None) or {}
        kw.setdefault("dtype", m.dtype)
        kw.setdefault("block_size", m.block_size)
        kw.setdefault("max_batch_size", m.max_batch_size)
        kw.setdefault("max_num_tokens", m.max_num_tokens)
        kw.setdefault("max_seq_len", m.max_seq_len)
        if q and "quant" not in kw:
            kw["quant"] = QuantSpec(q["scheme"], q["group_size"], q["symmetric"],
                                    "lm_head" not in q.get("unquantized", ()))
        if m.medusa and "medusa" not in kw:
            kw["medusa"] = (int(m.medusa["num_heads"]), int(m.medusa["num_layers"]))
        return plan(cfg, device, **kw)
    cfg = ModelConfig.from_dir(p)
    if "medusa" not in kw:
        kw["medusa"] = medusa_shape(p)
    return plan(cfg, device, **kw)


def medusa_shape(model_dir) -> tuple[int, int]:
    """(num_heads, num_layers) of MODEL/medusa, (0, 0) when absent."""
    from pathlib import Path

    f = Path(model_dir) / "medusa" / "config.json"
    if not f.is_file():
        return (0, 0)
    d = json.loads(f.read_text())
    return (int(d["medusa_num_heads"]), int(d.get("medusa_num_layers", 1)))


__all__ = ["CPU_DEVICE", "DEVICES", "DEVICE_NAMES", "Device", "MemoryPlan", "PlanError", "QuantSpec",
           "activation_bytes", "check_quant", "default_symmetric", "get_device", "kv_bytes_per_block", "medusa_shape", "plan",
           "plan_from_folder", "quantized_linear_bytes", "weight_breakdown"]
