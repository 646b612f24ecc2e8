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
from apar_rt.export.op import OP_DOMAIN, OP_INPUTS, OP_TYPE, AttentionAttrs

STEP_INPUTS = OP_INPUTS[5:]   # block_tables, context_lens, query_start, mask: shared by every layer


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
    I64, F32 = TensorProto.INT64, TensorProto.FLOAT
    tables_type = _elem_type(g, step_names[0])
    top = ab.Nodes(attrs, "apar/idx/", inputs)
    s = ab.step_index(top)
    is_long = top.op("Cast", [s.is_long], to=top.I64)
    any_long = top.op("Greater", [top.op("ReduceMax", [is_long], keepdims=0), top.zero])
    is_decode = top.op("LessOrEqual", [top.op("ReduceMax", [s.q_len], keepdims=0), top.one])

    def if_node(into: ab.Nodes, cond, then_b, then_outs, else_b, else_outs, tag, types) -> list[str]:
        """An If node appended to `into`, its branches the nodes of `then_b` / `else_b` with
        outputs `then_outs` / `else_outs` (of element types `types`); returns its outputs."""
        names = [f"apar/{tag}_{k}" for k in range(len(types))]

        def graph(b, outs, name):
            return helper.make_graph(b.nodes, name, [],
                                     [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])

        into.nodes.append(helper.make_node("If", [cond], names, name=f"apar/{tag}",
                                           then_branch=graph(then_b, then_outs, f"apar_{tag}_then"),
                                           else_branch=graph(else_b, else_outs, f"apar_{tag}_else")))
        return names

    # The short group: a decode step's index (rows in packed order), or the general one. Outputs:
    # N, R, L, q_idx, k_idx, tables, bias, the rows of a step without long sequences, and what
    # `packed_rows` reads of the group (short_end, short_n, n_short; unused on decode steps, where
    # there is no long group). Each output is its own tensor: an If branch that lists one name
    # twice confuses onnxruntime.
    types = [I64, I64, I64, I64, I64, tables_type, F32, I64, I64, I64, I64]
    dec = ab.Nodes(attrs, "apar/dec/", inputs)
    di = ab.decode_group(dec, s)
    dec_outs = [dec.op("Identity", [di.N]), di.R, di.L, di.q_idx, di.k_idx, di.tables,
                ab.mha_bias(dec, di, G),
                dec.op("Squeeze", [di.q_idx, dec.i1]), dec.op("Identity", [s.q_len]),
                dec.op("Identity", [s.q_len]), dec.const([0])]
    gen = ab.Nodes(attrs, "apar/short/", inputs)
    sg = ab.short_group(gen, s)
    si = sg.index
    gen_outs = [si.N, si.R, si.L, si.q_idx, si.k_idx, si.tables, ab.mha_bias(gen, si, G),
                ab.packed_rows(gen, s, sg, None), sg.short_end, sg.short_n, sg.n_short]
    N, R, L, q_idx, k_idx, tables, short_bias, short_rows, short_end, short_n, n_short = if_node(
        top, is_decode, dec, dec_outs, gen, gen_outs, "short", types)
    short_index = ab.GroupIndex(N=N, R=R, Qn="", L=L, K="", q_idx=q_idx, k_idx=k_idx, tables=tables, vis="")
    sg = ab.ShortGroup(short_index, short_n, short_end, n_short)

    # The long group, only in steps that have one: N, R, L, q_idx, k_idx, tables, bias, and the
    # packed rows of both groups.
    types = [I64, I64, I64, I64, I64, tables_type, F32, I64]
    mixed = ab.Nodes(attrs, "apar/long/", inputs)
    lg = ab.long_group(mixed, s)
    li = lg.index
    mixed_outs = [li.N, li.R, li.L, li.q_idx, li.k_idx, li.tables, ab.mha_bias(mixed, li, G),
                  ab.packed_rows(mixed, s, sg, lg)]
    none = ab.Nodes(attrs, "apar/noLong/", inputs)
    none_outs = [none.const([0]), none.const([1]), none.const([0]), none.empty([0, 1], I64),
                 none.empty([0, 0], I64), none.empty([0, 0], tables_type), none.empty([0, 1, G, 0], F32),
                 none.op("Identity", [short_rows])]
    N, R, L, q_idx, k_idx, tables, long_bias, rows = if_node(
        top, any_long, mixed, mixed_outs, none, none_outs, "long", types)
    long_index = ab.GroupIndex(N=N, R=R, Qn="", L=L, K="", q_idx=q_idx, k_idx=k_idx, tables=tables, vis="")

    # ---- layer math ----
    replaced = {}
    for i, n in enumerate(nodes):
        b = ab.Nodes(attrs, f"apar/l{i}/", inputs)
        q, k, v, k_cache, v_cache = n.input[:5]
        q2, k2, v2 = (b.reshape(x, [s.T, b.op("Mul", [h, b.D])])            # [T, heads * D]
                      for x, h in ((q, b.Hq), (k, b.Hkv), (v, b.Hkv)))
        short_out = ab.attend_mha(b, short_index, short_bias, G, q2, k2, v2, k_cache, v_cache)
        # the long group only when the step has one (an If, so that other steps skip its nodes)
        lb = ab.Nodes(attrs, f"apar/l{i}/long/", inputs)
        long_out = ab.attend_mha(lb, long_index, long_bias, G, q2, k2, v2, k_cache, v_cache)
        nb = ab.Nodes(attrs, f"apar/l{i}/nolong/", inputs)
        none_out = nb.empty([0, attrs.num_heads, attrs.head_size], F32)
        long_if, = if_node(b, any_long, lb, [long_out], nb, [none_out], f"l{i}/long_attention", [F32])
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
