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
