"""`apar.TreePagedAttention` as ONNX Runtime's CPU backend runs it: a graph rewrite on load.

The engine file keeps the op's standard-op FunctionProto (any ONNX consumer can run it). On the
CPU, `rewrite(model)` replaces the op's nodes with the same math (`apar_rt.export.attention_body`)
laid out for ONNX Runtime:

- each group's masked attention is one `com.microsoft.MultiHeadAttention` (one MHA head per KV
  head; K/V gathered as [.., Hkv*D], so no transposes without GQA);
- the index math runs once per step at the top level, not once per layer: the short group's
  always, the long group's (prefill chunks, draft trees) inside one `If` that runs only when the
  step has a sequence with more than SHORT_MAX new tokens. A decode step (decodes and forks
  only) thus skips the long group's index math; its layers run the long group on empty tensors.

Tested against the float64 oracle in tests/test_tree_attention.py (impl "onnx-ort").
"""

from __future__ import annotations

from apar_rt.export import attention_body as ab
from apar_rt.export.op import OP_DOMAIN, OP_TYPE, AttentionAttrs

STEP_INPUTS = ("block_tables", "context_lens", "query_start", "mask")   # the op's inputs 5..8


def _attrs(node) -> AttentionAttrs:
    from onnx import helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    return AttentionAttrs(int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_size"]),
                          int(a["block_size"]), float(a["scale"]))


def _elem_type(graph, name: str) -> int:
    from onnx import TensorProto

    for vi in list(graph.input) + list(graph.value_info):
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    return TensorProto.INT32


def rewrite(model) -> int:
    """Replace every `apar.TreePagedAttention` node of `model` (a ModelProto, changed in place);
    returns how many. The nodes must share their attributes and step-wide inputs (one model)."""
    from onnx import TensorProto, helper

    g = model.graph
    nodes = [n for n in g.node if (n.domain, n.op_type) == (OP_DOMAIN, OP_TYPE)]
    if not nodes:
        return 0
    attrs = {_attrs(n) for n in nodes}
    step_names = {tuple(n.input[5:9]) for n in nodes}
    if len(attrs) != 1 or len(step_names) != 1:
        raise ValueError(f"{OP_TYPE} nodes with different attributes or step inputs: {attrs}, {step_names}")
    attrs, step_names = attrs.pop(), step_names.pop()
    G = attrs.num_heads // attrs.num_kv_heads
    inputs = dict(zip(STEP_INPUTS, step_names))

    # ---- index math, once per step ----
    top = ab.Nodes(attrs, "apar/idx/", inputs)
    s = ab.step_index(top)
    sg = ab.short_group(top, s)
    short_bias = ab.mha_bias(top, sg.index, G)
    any_long = top.op("Greater", [top.op("ReduceMax", [top.op("Cast", [s.is_long], to=top.I64)], keepdims=0),
                                  top.zero])
    I64, F32 = TensorProto.INT64, TensorProto.FLOAT
    tables_type = _elem_type(g, step_names[0])
    # the long group's N, R, L, q_idx, k_idx, tables, bias, and the packed rows
    out_types = [I64, I64, I64, I64, I64, tables_type, F32, I64]
    mixed = ab.Nodes(attrs, "apar/long/", inputs)
    lg = ab.long_group(mixed, s)
    li = lg.index
    mixed_outs = [li.N, li.R, li.L, li.q_idx, li.k_idx, li.tables, ab.mha_bias(mixed, li, G),
                  ab.packed_rows(mixed, s, sg, lg)]
    short_only = ab.Nodes(attrs, "apar/noLong/", inputs)

    def empty(dims, dtype):
        out = short_only.name("empty")
        short_only.nodes.append(helper.make_node("Constant", [], [out], value=helper.make_tensor(out, dtype, dims, [])))
        return out

    # (each output its own tensor: a branch that lists one name twice confuses onnxruntime's If)
    short_outs = [short_only.const([0]), short_only.const([1]), short_only.const([0]), empty([0, 1], I64), empty([0, 0], I64),
                  empty([0, 0], tables_type), empty([0, 1, G, 0], F32), ab.packed_rows(short_only, s, sg, None)]
    names = [f"apar/long_{k}" for k in ("N", "R", "L", "q_idx", "k_idx", "tables", "bias", "rows")]

    def branch(b: ab.Nodes, outs: list[str], tag: str):
        vis = [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types)]
        return helper.make_graph(b.nodes, f"apar_{tag}", [], vis)

    top.nodes.append(helper.make_node("If", [any_long], names, name="apar/long_index",
                                      then_branch=branch(mixed, mixed_outs, "long_index"),
                                      else_branch=branch(short_only, short_outs, "no_long_index")))
    N, R, L, q_idx, k_idx, tables, long_bias, rows = names
    long_index = ab.GroupIndex(N=N, R=R, Qn="", L=L, K="", q_idx=q_idx, k_idx=k_idx, tables=tables, vis="")

    # ---- layer math ----
    replaced = {}
    for i, n in enumerate(nodes):
        b = ab.Nodes(attrs, f"apar/l{i}/", inputs)
        q, k, v, k_cache, v_cache = n.input[:5]
        q2, k2, v2 = (b.reshape(x, [s.T, b.op("Mul", [h, b.D])]) for x, h in ((q, b.Hq), (k, b.Hkv), (v, b.Hkv)))
        short_out = ab.attend_mha(b, sg.index, short_bias, G, q2, k2, v2, k_cache, v_cache)
        # the long group only when the step has one (an If, so that decode steps skip its nodes)
        lb = ab.Nodes(attrs, f"apar/l{i}/long/", inputs)
        long_out = ab.attend_mha(lb, long_index, long_bias, G, q2, k2, v2, k_cache, v_cache)
        nb = ab.Nodes(attrs, f"apar/l{i}/nolong/", inputs)
        none_out = nb.name("empty")
        nb.nodes.append(helper.make_node("Constant", [], [none_out], value=helper.make_tensor(
            none_out, F32, [0, attrs.num_heads, attrs.head_size], [])))
        long_if = b.name("long_attention")
        b.nodes.append(helper.make_node(
            "If", [any_long], [long_if],
            then_branch=helper.make_graph(lb.nodes, f"apar_l{i}_long", [], [helper.make_tensor_value_info(long_out, F32, None)]),
            else_branch=helper.make_graph(nb.nodes, f"apar_l{i}_nolong", [], [helper.make_tensor_value_info(none_out, F32, None)])))
        both = b.op("Concat", [short_out, long_if], axis=0)
        b.nodes.append(helper.make_node("CastLike", [b.op("Gather", [both, rows], axis=0), q], [n.output[0]]))
        replaced[id(n)] = b.nodes
    new_nodes = []
    for n in g.node:   # the index math goes right before the first layer's attention
        if id(n) in replaced and top.nodes:
            new_nodes += top.nodes
            top.nodes = []
        new_nodes += replaced.get(id(n), [n])
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [f for f in model.functions if (f.domain, f.name) != (OP_DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    if not any(o.domain == ab.ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ab.ORT_DOMAIN, 1))
    return len(nodes)
