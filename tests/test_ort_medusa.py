"""Drafting's heads model (`apar_rt.backends.ort_medusa.rank_heads`) against `ranked_top_k`.

The heads here are small integer matrices on integer hidden states, so their logits are exact
and full of ties: the ranked ids must be `ranked_top_k`'s of the first n heads' logits (largest
first, ties to the lower id), whether the heads past n are cut from the graph (a Concat of the
heads, as the exporter writes them, with or without a Cast after it) or the output is sliced (a
graph that does not end in such a Concat).
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from apar_rt.backends.ort_medusa import RANK_INPUT, RANK_OUTPUT, rank_heads
from apar_rt.sampler import ranked_top_k

HIDDEN, VOCAB, HEADS = 6, 40, 4


def _heads_model(weights: np.ndarray, layout: str):
    """hidden [R, HIDDEN] -> "logits" [R, HEADS, VOCAB], one MatMul per head; `layout`: "concat"
    (Unsqueeze each, Concat on axis 1), "cast" (the same, then a Cast to float) or "stack" (a
    Concat on the last axis, then a Reshape: no per-head Concat to cut)."""
    nodes, inits = [], [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    for h in range(HEADS):
        inits.append(numpy_helper.from_array(weights[h], f"w{h}"))
        nodes.append(helper.make_node("MatMul", ["hidden", f"w{h}"], [f"l{h}"]))
    if layout == "stack":
        inits.append(numpy_helper.from_array(np.array([0, HEADS, VOCAB], np.int64), "shape"))
        nodes += [helper.make_node("Concat", [f"l{h}" for h in range(HEADS)], ["flat"], axis=1),
                  helper.make_node("Reshape", ["flat", "shape"], ["logits"])]
    else:
        nodes += [helper.make_node("Unsqueeze", [f"l{h}", "axis1"], [f"u{h}"]) for h in range(HEADS)]
        cat = "logits" if layout == "concat" else "cat"
        nodes.append(helper.make_node("Concat", [f"u{h}" for h in range(HEADS)], [cat], axis=1))
        if layout == "cast":
            nodes.append(helper.make_node("Cast", ["cat"], ["logits"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [None, HIDDEN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("layout", ["concat", "cast", "stack"])
def test_ranked_heads_are_ranked_top_k_of_the_first_heads(layout):
    rng = np.random.default_rng(0)
    weights = rng.integers(-2, 3, (HEADS, HIDDEN, VOCAB)).astype(np.float32)
    weights[:, :, 7] = weights[:, :, 3]          # whole columns tied, besides the many chance ties
    model = _heads_model(weights, layout)
    hidden = rng.integers(-2, 3, (5, HIDDEN)).astype(np.float32)
    hidden[1] = 0                                 # a row of all-zero logits: every id tied
    logits = _session(model).run(None, {"hidden": hidden})[0]
    assert logits.shape == (5, HEADS, VOCAB)
    for n in range(1, HEADS + 1):
        ranked = rank_heads(model, n, "logits")
        matmuls = sum(node.op_type == "MatMul" for node in ranked.graph.node)
        assert matmuls == (HEADS if layout == "stack" else n)   # the heads past n are cut where they can be
        assert len(model.graph.node) == len(_heads_model(weights, layout).graph.node)   # the input is unchanged
        session = _session(ranked)
        for k in (1, 3, VOCAB, VOCAB + 5):
            got = session.run([RANK_OUTPUT], {"hidden": hidden, RANK_INPUT: np.array([min(k, VOCAB)], np.int64)})[0]
            want = ranked_top_k(logits[:, :n].reshape(-1, VOCAB), k).reshape(5, n, -1)
            np.testing.assert_array_equal(got, want, err_msg=f"{layout}: {n} heads, k={k}")


def _resblock_heads(rng, heads: int, hidden: int, vocab: int):
    """Medusa-1 heads as the exporter writes them: per head x + SiLU(Gemm(x, W, b, transB=1)),
    then MatMul to the vocabulary; Unsqueeze each, Concat on axis 1. Returns (model, weights)."""
    nodes, inits, weights = [], [numpy_helper.from_array(np.array([1], np.int64), "axis1")], []
    for h in range(heads):
        w1 = rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.3
        b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
        w2 = rng.standard_normal((hidden, vocab)).astype(np.float32)
        weights.append((w1, b1, w2))
        inits += [numpy_helper.from_array(w1, f"w1_{h}"), numpy_helper.from_array(b1, f"b1_{h}"),
                  numpy_helper.from_array(w2, f"w2_{h}")]
        nodes += [helper.make_node("Gemm", ["hidden", f"w1_{h}", f"b1_{h}"], [f"g{h}"], transB=1),
                  helper.make_node("Sigmoid", [f"g{h}"], [f"s{h}"]),
                  helper.make_node("Mul", [f"g{h}", f"s{h}"], [f"a{h}"]),
                  helper.make_node("Add", ["hidden", f"a{h}"], [f"r{h}"]),
                  helper.make_node("MatMul", [f"r{h}", f"w2_{h}"], [f"l{h}"]),
                  helper.make_node("Unsqueeze", [f"l{h}", "axis1"], [f"u{h}"])]
    nodes.append(helper.make_node("Concat", [f"u{h}" for h in range(heads)], ["logits"], axis=1))
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [None, hidden])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def _dequantized_logits(hidden: np.ndarray, weights) -> np.ndarray:
    """The oracle of int8_weights (float64): each matmul of dequantized int8 weights (per column,
    max |column| / INT8_WEIGHT_MAX) and of its input quantized as DynamicQuantizeLinear does (uint8,
    one scale and zero point for the whole input), then dequantized."""
    from apar_rt.backends.ort_medusa import INT8_WEIGHT_MAX as top

    def weight(w):
        scale = np.abs(w).max(axis=0) / float(top)
        scale[scale == 0] = 1.0
        return np.clip(np.rint(w / scale), -top, top) * scale

    def activation(x):
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = np.float32((hi - lo) / 255)
        zero = np.clip(np.rint(-lo / scale), 0, 255)
        return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * np.float64(scale)

    out = []
    for w1, b1, w2 in weights:
        g = activation(hidden) @ weight(w1.T.astype(np.float64)) + b1
        r = hidden + g / (1 + np.exp(-g))
        out.append(activation(r) @ weight(w2.astype(np.float64)))
    return np.stack(out, axis=1)


def test_int8_ranked_heads_rank_the_dequantized_heads():
    """int8_weights turns every heads' Gemm and MatMul into a DynamicQuantizeMatMul; the ranked
    ids are the best of the dequantize-then-matmul oracle's logits (their values equal the
    oracle's k largest, up to float32 rounding), for every head count and k."""
    from apar_rt.backends.ort_medusa import int8_weights

    rng = np.random.default_rng(1)
    hidden_size, vocab = 16, 50
    model, weights = _resblock_heads(rng, HEADS, hidden_size, vocab)
    hidden = rng.standard_normal((6, hidden_size)).astype(np.float32)
    oracle = _dequantized_logits(hidden.astype(np.float64), weights)
    exact = _session(model).run(None, {"hidden": hidden})[0]
    assert np.abs(oracle - exact).max() > 1e-3   # the oracle is not the float32 heads
    for n in range(1, HEADS + 1):
        q = int8_weights(rank_heads(model, n, "logits"))
        ops = [node.op_type for node in q.graph.node]
        assert ops.count("DynamicQuantizeMatMul") == 2 * n and "MatMul" not in ops and "Gemm" not in ops
        for k in (1, 4):
            got = _session(q).run([RANK_OUTPUT], {"hidden": hidden, RANK_INPUT: np.array([k], np.int64)})[0]
            want = -np.sort(-oracle[:, :n], axis=-1)[..., :k]
            picked = np.take_along_axis(oracle[:, :n], got, axis=-1)
            np.testing.assert_allclose(picked, want, atol=1e-4 * np.abs(oracle).max(), err_msg=f"{n} heads, k={k}")
