"""The Medusa heads apart from the step graph, run only on the rows that draft.

An engine built with heads computes `medusa_logits` in its step graph, for every logits row of
every step: each node of a draft tree and the rows of requests that do not draft at all (sampled
requests under greedy acceptance). Drafting reads them at one row per drafting thread, the last
accepted node, as vLLM's Medusa proposer reads the target model's hidden states after
verification. `split_heads(model)` cuts the heads out when the backend loads the engine: the
step graph outputs the hidden states the heads read (the final hidden states at the logits rows)
in place of `medusa_logits`, and the heads become a graph of their own (hidden -> medusa_logits),
which the backend runs on the rows `medusa_topk` asks for. Same nodes, same weights (the heads'
initializers move over as they are, external-data references included); the engine file is
unchanged.

Drafting reads only each head's best few ids, and only the heads its tree is deep enough to use.
`rank_heads(heads, n)` turns the heads' model into the one drafting runs: the heads past the
first n are cut where the output concatenates the heads (their projections to the vocabulary
are most of the heads' cost), and a TopK ranks each remaining head's logits in the graph. Only
the [R, n, k] ids leave the session. On the demo model at batch 1 (cProfile) a drafting call
took 165 us instead of 390 (170 for the four heads, then 220 for `ranked_top_k` in numpy).

`int8_weights(model)` then stores the heads' float32 matrices as int8 (per output column,
symmetric) for onnxruntime's DynamicQuantizeMatMul, which quantizes each call's activations to
uint8: a quarter of the bytes the projections stream per drafting call. Drafts only propose
tokens, which the target model verifies, so greedy output does not change; typical acceptance
also still tests each drafted token against the request's own distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

from apar_rt.backends.onnx_graph import drop_outputs, live, producers_and_uses, subgraph_reads

RANK_INPUT = "apar_medusa_k"        # rank_heads' model: how many ids per head, [1] int64
RANK_OUTPUT = "apar_medusa_ranked"  # ... and its output, [R, heads, k] int64
# int8_weights' largest weight magnitude: 7 bits, not 8 (onnxruntime's quantizer's reduce_range).
# On x86 CPUs without VNNI, DynamicQuantizeMatMul multiplies uint8 activations by int8 weights with
# vpmaddubsw, which adds two products into an int16 and saturates past 32,767: 2 * 255 * 127 would
# overflow, 2 * 255 * 63 cannot. With 127, an AMD EPYC (AVX2) ranked the wrong ids.
INT8_WEIGHT_MAX = 63


@dataclass
class HeadsSplit:
    """What `split_heads` made: the step graph's new output and the heads' own model."""

    hidden: str        # the step graph's output that replaces medusa_logits: the heads' input [N, hidden]
    heads: object      # onnx.ModelProto: hidden -> the medusa output


def split_heads(model, output: str, hidden_type: int) -> HeadsSplit | None:
    """Cut the nodes that only `output` needs out of `model` (a ModelProto, changed in place) into
    a model of their own, when they read exactly one value the rest of the graph makes (besides
    initializers and constants), of element type `hidden_type` (the model's dtype: onnx's
    TensorProto enum); else None, and `model` is unchanged."""
    from onnx import helper

    g = model.graph
    if output not in [o.name for o in g.output]:
        return None
    others = {o.name for o in g.output if o.name != output}
    shared_nodes, _ = live(list(g.node), others)
    shared = {id(n) for n in shared_nodes}
    heads_nodes = [n for n in live(list(g.node), {output})[0] if id(n) not in shared]
    made_inside = {o for n in heads_nodes for o in n.output}
    inits = {t.name: t for t in g.initializer}
    producer, _ = producers_and_uses(g.node)
    # what they read from outside, in order, once each
    reads = dict.fromkeys(i for n in heads_nodes for i in [*n.input, *sorted(subgraph_reads(n))]
                          if i and i not in made_inside)
    boundary, constants = [], []
    for name in reads:
        if name in inits:
            continue
        src = producer.get(name)
        if src is not None and src.op_type == "Constant":
            constants.append(src)
        else:
            boundary.append(name)
    if len(boundary) != 1 or boundary[0] in [i.name for i in g.input]:
        return None
    hidden = boundary[0]
    out_info = next(o for o in g.output if o.name == output)
    heads_graph = helper.make_graph(
        [*constants, *heads_nodes], "medusa_heads",
        [helper.make_tensor_value_info(hidden, hidden_type, None)],
        [out_info], [t for name, t in inits.items() if name in reads])
    heads = helper.make_model(heads_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    # the step graph: `hidden` out instead of the heads' output, and nothing only the heads needed
    g.output.append(helper.make_tensor_value_info(hidden, hidden_type, None))
    drop_outputs(g, {output})
    return HeadsSplit(hidden, heads)


def rank_heads(heads, num_heads: int, output: str):
    """The heads' model `heads` (hidden -> `output` [R, H, V], a ModelProto; not changed) as
    drafting runs it: hidden, RANK_INPUT k -> RANK_OUTPUT [R, num_heads, k] int64, each of the
    first `num_heads` heads' k largest logits' token ids, largest first (ONNX TopK: ties to the
    lower id, as `apar_rt.sampler.ranked_top_k`; among -inf or NaN logits the order is TopK's).

    When `output` is (a Cast of) a Concat of the heads on axis 1, the heads past `num_heads` are
    cut from the graph with all that only they computed; otherwise all are computed and the first
    `num_heads` sliced out."""
    from onnx import TensorProto, helper

    model = type(heads)()
    model.CopyFrom(heads)
    g = model.graph
    p = "apar/medusa_rank/"
    ranked_from = output
    if not _cut_heads(g, output, num_heads):   # take the first num_heads of the output
        for name, v in (("start", 0), ("end", num_heads), ("axis", 1)):
            g.initializer.append(helper.make_tensor(p + name, TensorProto.INT64, [1], [v]))
        g.node.append(helper.make_node("Slice", [output, p + "start", p + "end", p + "axis"], [p + "first"]))
        ranked_from = p + "first"
    g.node.append(helper.make_node("TopK", [ranked_from, RANK_INPUT], [p + "values", RANK_OUTPUT],
                                   axis=-1, largest=1, sorted=1))
    g.input.append(helper.make_tensor_value_info(RANK_INPUT, TensorProto.INT64, [1]))
    g.output.append(helper.make_tensor_value_info(RANK_OUTPUT, TensorProto.INT64, None))
    drop_outputs(g, {output})   # with the heads past num_heads, once cut
    return model


def _cut_heads(g, output: str, num_heads: int) -> bool:
    """Keep only the first `num_heads` inputs of the Concat (axis 1) that makes `output`, directly
    or through one Cast; False where the graph is not so (unchanged)."""
    from onnx import helper

    producer, uses = producers_and_uses(g.node)
    node = producer.get(output)
    if node is not None and node.op_type == "Cast" and uses.get(node.input[0]) == 1:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Concat":
        return False
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
    if axis not in (1, -2) or not 0 < num_heads <= len(node.input):
        return False
    del node.input[num_heads:]
    return True


def int8_weights(model, folder: str | None = None):
    """`model` (a ModelProto; not changed) with each MatMul and Gemm (alpha = beta = 1) whose
    weight is a 2-D float32 initializer as a com.microsoft.DynamicQuantizeMatMul: the weight as
    int8 [K, N], scaled per column by max |column| / INT8_WEIGHT_MAX (a column of zeros by 1), the Gemm's
    bias kept as its bias. `folder`: where external initializer data lies."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    out = type(model)()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    p = "apar/int8/"
    nodes, new_inits, replaced = [], [], set()
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        plain_gemm = (n.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                      and not attrs.get("transA", 0) and (len(n.input) < 3 or n.input[2] == "" or n.input[2] in inits))
        if (n.op_type != "MatMul" and not plain_gemm) or w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 2:
            nodes.append(n)
            continue
        weight = numpy_helper.to_array(w, folder or "")
        if n.op_type == "Gemm" and attrs.get("transB", 0):
            weight = weight.T
        scale = np.abs(weight).max(axis=0) / float(INT8_WEIGHT_MAX)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(weight / scale), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX).astype(np.int8)
        k = len(new_inits) // 2
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(q), f"{p}w{k}"),
                      numpy_helper.from_array(scale.astype(np.float32), f"{p}scale{k}")]
        bias = n.input[2] if n.op_type == "Gemm" and len(n.input) > 2 else ""
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [n.input[0], f"{p}w{k}", f"{p}scale{k}", "", bias],
                                      list(n.output), name=f"{p}{k}", domain="com.microsoft"))
        replaced.add(n.input[1])
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name not in replaced or t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    if new_inits and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out
