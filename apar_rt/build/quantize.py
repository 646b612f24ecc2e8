"""Weight-only INT8/INT4 quantization of the exported step graph (`apar-rt build --quantize`).

A separate pass over model.onnx, after export and before the engine is built:

* every linear layer of the decoder (q/k/v/o, gate/up/down) and of the Medusa heads' ResBlocks
  is quantized in groups of `group_size` input features, round-to-nearest;
* embeddings, norms, the LM head and the Medusa heads' vocabulary projections stay in the
  engine dtype (`quantize_lm_head` quantizes the LM head and those projections too);
* ONNX Runtime engines get `com.microsoft.MatMulNBits` (ORT's own CPU/CUDA kernels), written by
  ORT's quantizer, `onnxruntime.quantization.MatMulNBitsQuantizer`;
* TensorRT engines get a blocked `DequantizeLinear` (opset 21, `block_size` attribute) feeding
  the MatMul, TensorRT's weight-only pattern. INT4 is written by the same ORT quantizer
  (QDQ format); for INT8 that quantizer refuses QDQ, so `_qdq_int8` writes the same pattern
  with the same round-to-nearest arithmetic.

The Medusa ResBlocks are exported as Gemm (with bias), which the quantizer does not take, so
they are first rewritten as MatMul + Add (`_gemm_to_matmul`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apar_rt.memory_plan import QuantSpec

QDQ_OPSET = 21                      # DequantizeLinear with block_size and INT4 types
FORMATS = {"onnxruntime": "MatMulNBits", "tensorrt": "DequantizeLinear"}
# First releases that build weight-only INT8/INT4 (blocked DequantizeLinear feeding a MatMul):
# TensorRT 10.0 introduced INT4 weight-only (block quantization); TensorRT-RTX has it from 1.0.
TENSORRT_WEIGHT_ONLY_MIN = {("tensorrt", "int4"): (10, 0), ("tensorrt", "int8"): (10, 0),
                            ("tensorrt_rtx", "int4"): (1, 0), ("tensorrt_rtx", "int8"): (1, 0)}


def check_tensorrt_support(library: str, version: str, spec: QuantSpec) -> None:
    """ValueError unless TensorRT `library` `version` builds `spec`'s weight-only engines.

    TensorRT takes signed INT4/INT8 weights with no zero point, so TensorRT engines are symmetric.
    """
    if not spec.symmetric:
        raise ValueError(f"--asymmetric: TensorRT's weight-only {spec.scheme} takes signed weights with no zero "
                         f"point; build TensorRT engines with --symmetric (the default for --backend tensorrt)")
    need = TENSORRT_WEIGHT_ONLY_MIN[(library, spec.scheme)]
    have = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in (version.split(".") + ["0"])[:2])
    if have < need:
        label = "TensorRT-RTX" if library == "tensorrt_rtx" else "TensorRT"
        raise ValueError(f"--quantize {spec.scheme} needs {label} >= {'.'.join(map(str, need))} (weight-only "
                         f"{spec.scheme}: blocked DequantizeLinear into MatMul); this is {label} {version}")


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    record: dict                    # the manifest's "quantization" field
    files: tuple[Path, ...]         # model.onnx and its external data file, if any


def quantize_onnx(path: str | Path, spec: QuantSpec, *, target: str, vocab_size: int,
                  external_data: bool = True) -> QuantizeResult:
    """Quantize model.onnx at `path` in place.

    Args:
        path: the exported step graph.
        spec: scheme (int8/int4), group size, symmetric or not, and whether the LM head is quantized.
        target: "onnxruntime" (MatMulNBits) or "tensorrt" (blocked DequantizeLinear -> MatMul).
        vocab_size: the model's vocabulary (MatMuls producing it are the LM head and Medusa projections).
        external_data: False keeps the weights inside the .onnx file (`onnx_export.save_model`).

    Returns:
        The manifest record and the files written.

    Raises:
        ValueError: a scheme, target or group size that does not apply.
    """
    import onnx

    if spec.scheme not in ("int8", "int4"):
        raise ValueError(f"quantize scheme must be int8 or int4, got {spec.scheme!r}")
    if target not in FORMATS:
        raise ValueError(f"quantize target must be one of {', '.join(FORMATS)}, got {target!r}")
    from apar_rt.export.onnx_export import save_model

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=True)
    _gemm_to_matmul(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    chosen, kept = [], []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
            continue
        k, n = inits[node.input[1]].dims
        if n == vocab_size and not spec.quantize_lm_head:
            kept.append(node.name)
            continue
        if k % spec.group_size:
            raise ValueError(f"--group-size {spec.group_size} does not divide the {k} input features of "
                             f"{node.name}")
        chosen.append(node.name)
    if not chosen:
        raise ValueError(f"{path} has no linear layer to quantize")

    if target == "tensorrt" and spec.scheme == "int8":
        proto = _qdq_int8(proto, set(chosen), spec)
        quantizer = "apar_rt.build.quantize.rtn_quantize (round-to-nearest)"
    else:
        if target == "tensorrt":       # INT4 DequantizeLinear needs opset 21 and IR version 10
            _set_opset(proto, QDQ_OPSET)
            proto.ir_version = max(proto.ir_version, 10)
        proto = _ort_quantize(proto, kept, spec, qdq=target == "tensorrt")
        import onnxruntime
        quantizer = f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer (round-to-nearest)"
    op = "MatMulNBits" if target == "onnxruntime" else "DequantizeLinear"
    done = sum(1 for nd in proto.graph.node if nd.op_type == op)
    if done != len(chosen):
        raise RuntimeError(f"quantization wrote {done} {op} nodes for the {len(chosen)} chosen layers")
    if target == "tensorrt":
        _set_opset(proto, QDQ_OPSET)
    files = save_model(proto, path, external_data)
    record = {"scheme": spec.scheme, "bits": spec.bits, "group_size": spec.group_size,
              "symmetric": spec.symmetric, "format": FORMATS[target], "quantizer": quantizer,
              "quantized_layers": len(chosen),
              "unquantized": ["embed_tokens", "norms", *(["lm_head"] if not spec.quantize_lm_head else []),
                              *(["medusa_vocab_projections"] if any(k.startswith("/heads/") for k in kept)
                                else [])],
              "unquantized_nodes": kept}
    return QuantizeResult(record, files)


def _ort_quantize(proto, exclude: list[str], spec: QuantSpec, *, qdq: bool):
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:   # the quantizer's module calls logging.basicConfig(level=INFO) on import: undo that
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    fmt = QuantFormat.QDQ if qdq else QuantFormat.QOperator
    q = MatMulNBitsQuantizer(proto, bits=spec.bits, block_size=spec.group_size, is_symmetric=spec.symmetric,
                             nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",), quant_format=fmt)
    q.process()
    return q.model.model


def _gemm_to_matmul(proto) -> None:
    """Gemm(A, W, b) with constant W (alpha = beta = 1, no transA) -> MatMul(A, W as [K, N]) + Add(b)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    new_nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = w.T.copy()
        w_name = node.input[1] + "_kn"
        proto.graph.initializer.append(numpy_helper.from_array(w, w_name))
        if len(node.input) < 3 or not node.input[2]:
            new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], list(node.output),
                                              name=node.name + "_MatMul"))
            continue
        mid = node.output[0] + "_matmul"
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mid], name=node.name + "_MatMul"))
        new_nodes.append(helper.make_node("Add", [mid, node.input[2]], list(node.output), name=node.name + "_Add"))
    _replace_nodes(proto, new_nodes)


def _replace_nodes(proto, new_nodes) -> None:
    """Make `new_nodes` the graph's nodes and drop the initializers no node reads any more."""
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    used = {i for nd in proto.graph.node for i in nd.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def rtn_quantize(w, bits: int, group_size: int, symmetric: bool):
    """Round-to-nearest quantization of a [K, N] weight in groups of `group_size` rows.

    Returns (q, scales, zero_points): q [K, N] integers (int range for symmetric, uint for
    asymmetric), scales and zero points [K/group_size, N]. Dequantized: (q - zp) * scale.
    """
    import numpy as np

    k, n = w.shape
    g = w.reshape(k // group_size, group_size, n).astype(np.float32)
    if symmetric:
        hi = (1 << (bits - 1)) - 1
        amax = np.abs(g).max(axis=1)
        scale = np.where(amax == 0, 1.0, amax / hi).astype(np.float32)
        zp = np.zeros_like(scale, dtype=np.int32)
        q = np.clip(np.rint(g / scale[:, None, :]), -hi - 1, hi).astype(np.int32)
    else:
        qmax = (1 << bits) - 1
        mn = np.minimum(g.min(axis=1), 0.0)
        mx = np.maximum(g.max(axis=1), 0.0)
        scale = np.where(mx == mn, 1.0, (mx - mn) / qmax).astype(np.float32)
        zp = np.clip(np.rint(-mn / scale), 0, qmax).astype(np.int32)
        q = np.clip(np.rint(g / scale[:, None, :]) + zp[:, None, :], 0, qmax).astype(np.int32)
    return q.reshape(k, n), scale, zp


def _qdq_int8(proto, names: set[str], spec: QuantSpec):
    """MatMul(A, W) -> MatMul(A, DequantizeLinear(W int8/uint8, scales, [zp], axis=0, block_size=g))."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    new_nodes = []
    for node in proto.graph.node:
        if node.name not in names:
            new_nodes.append(node)
            continue
        w_name = node.input[1]
        w = numpy_helper.to_array(inits[w_name])
        q, scale, zp = rtn_quantize(w.astype(np.float32), 8, spec.group_size, spec.symmetric)
        qdtype = np.int8 if spec.symmetric else np.uint8
        qt = numpy_helper.from_array(q.astype(qdtype), w_name + "_DQ_Q8")
        st = numpy_helper.from_array(scale.astype(w.dtype), w_name + "_DQ_scales")
        proto.graph.initializer.extend([qt, st])
        dq_in = [qt.name, st.name]
        if not spec.symmetric:
            zt = numpy_helper.from_array(zp.astype(qdtype), w_name + "_DQ_zero_points")
            proto.graph.initializer.append(zt)
            dq_in.append(zt.name)
        out = qt.name + "_output"
        new_nodes.append(helper.make_node("DequantizeLinear", dq_in, [out], name=node.name + "_DQ_Q8", axis=0,
                                          block_size=spec.group_size))
        new_nodes.append(helper.make_node("MatMul", [node.input[0], out], list(node.output), name=node.name))
    _replace_nodes(proto, new_nodes)
    return proto


def _set_opset(proto, version: int) -> None:
    """The default domain's opset, in the model and in its local functions."""
    for imports in [proto.opset_import, *(f.opset_import for f in proto.functions)]:
        for o in imports:
            if o.domain in ("", "ai.onnx") and o.version < version:
                o.version = version


