"""`apar.TreePagedAttention` as ONNX Runtime's CPU backend runs it: a graph rewrite on load.

The engine file keeps the op's standard-op FunctionProto (any ONNX consumer can run it). On the
CPU, `rewrite(model)` replaces the op's nodes with the same math (`apar_rt.export.attention_body`)
laid out for ONNX Runtime:

- the KV pools are head-major, [Hkv, slots, D] (`POOL_LAYOUT`; the backend allocates them so),
  and each group's attention reads its context with one Gather per pool, straight into the
  layout the matmuls take (`attend_head_major`): no transpose and no concatenation of the
  context, which were two more copies of it per layer and step;
- the index math runs once per step at the top level, not once per layer: the short group's
  always, the long group's (prefill chunks, draft trees) inside one `If` that runs only when the
  step has a sequence with more than SHORT_MAX new tokens. A step of decodes and forks thus
  skips the long group's index math;
- each layer's attention is an `If`: a decode step (at most one new token per sequence, the
  common step) runs `attention_body.attend_decode`, about 20 nodes with no row gathers and
  constant shapes; any other step runs the short group and, in a nested `If`, the long group.

Tested against the float64 oracle in tests/test_tree_attention.py (impl "onnx-ort").
"""

from __future__ import annotations

from apar_rt.export import attention_body as ab
from apar_rt.export.op import OP_DOMAIN, OP_INPUTS, OP_TYPE, AttentionAttrs

STEP_INPUTS = OP_INPUTS[5:]   # block_tables, context_lens, query_start, mask: shared by every layer
POOL_LAYOUT = "[num_kv_heads, num_blocks * block_size, head_size]"   # the pools the rewritten graph takes


def to_head_major(pool):
    """A pool in the op's layout [num_blocks, block_size, Hkv, D] as the rewrite takes it (numpy)."""
    nb, bs, hkv, d = pool.shape
    return pool.transpose(2, 0, 1, 3).reshape(hkv, nb * bs, d)


def _attrs(node) -> AttentionAttrs:
    from onnx import helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    return AttentionAttrs(int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_size"]),
                          int(a["block_size"]), float(a["scale"]))


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
    # N, R, Qn, L, q_idx, k_idx, pool slots, bias, the rows of a step without long sequences, and
    # what `packed_rows` reads of the group (short_end, short_n, n_short; unused on decode steps,
    # where there is no long group). Each output is its own tensor: an If branch that lists one
    # name twice confuses onnxruntime.
    types = [I64, I64, I64, I64, I64, I64, I64, F32, I64, I64, I64, I64]
    dec = ab.Nodes(attrs, "apar/dec/", inputs)
    di = ab.decode_group(dec, s)
    dec_outs = [dec.op("Identity", [di.N]), di.R, di.Qn, di.L, di.q_idx, di.k_idx, ab.pool_slots(dec, di),
                ab.score_bias(dec, di, G), dec.op("Squeeze", [di.q_idx, dec.i1]), dec.op("Identity", [s.q_len]),
                dec.op("Identity", [s.q_len]), dec.const([0])]
    gen = ab.Nodes(attrs, "apar/short/", inputs)
    sg = ab.short_group(gen, s)
    si = sg.index
    gen_outs = [si.N, si.R, gen.op("Identity", [si.Qn]), si.L, si.q_idx, si.k_idx, ab.pool_slots(gen, si),
                ab.score_bias(gen, si, G), ab.packed_rows(gen, s, sg, None), sg.short_end, sg.short_n, sg.n_short]
    N, R, Qn, L_short, q_idx, k_idx, short_slots, short_bias, short_rows, short_end, short_n, n_short = if_node(
        top, is_decode, dec, dec_outs, gen, gen_outs, "short", types)
    short_index = ab.GroupIndex(N=N, R=R, Qn=Qn, L=L_short, K="", q_idx=q_idx, k_idx=k_idx, tables="", vis="")
    sg = ab.ShortGroup(short_index, short_n, short_end, n_short)

    # The long group, only in steps that have one: N, R, Qn, L, q_idx, k_idx, pool slots, bias, and
    # the packed rows of both groups.
    types = [I64, I64, I64, I64, I64, I64, I64, F32, I64]
    mixed = ab.Nodes(attrs, "apar/long/", inputs)
    lg = ab.long_group(mixed, s)
    li = lg.index
    mixed_outs = [li.N, li.R, mixed.op("Identity", [li.Qn]), li.L, li.q_idx, li.k_idx, ab.pool_slots(mixed, li),
                  ab.score_bias(mixed, li, G), ab.packed_rows(mixed, s, sg, lg)]
    none = ab.Nodes(attrs, "apar/noLong/", inputs)
    none_outs = [none.const([0]), none.const([1]), none.const([0]), none.const([0]), none.empty([0, 1], I64),
                 none.empty([0, 0], I64), none.empty([0, 0], I64), none.empty([0, G, 0], F32),
                 none.op("Identity", [short_rows])]
    N, R, Qn, L, q_idx, k_idx, long_slots, long_bias, rows = if_node(
        top, any_long, mixed, mixed_outs, none, none_outs, "long", types)
    long_index = ab.GroupIndex(N=N, R=R, Qn=Qn, L=L, K="", q_idx=q_idx, k_idx=k_idx, tables="", vis="")

    # ---- layer math ----
    replaced = {}
    split = top.op("Concat", [L_short, top.i1], axis=0)     # a decode step's scores: L context keys, 1 new
    for i, n in enumerate(nodes):
        b = ab.Nodes(attrs, f"apar/l{i}/", inputs)
        q, k, v, k_cache, v_cache = n.input[:5]
        # a decode step: half the nodes (attend_decode)
        db = ab.Nodes(attrs, f"apar/l{i}/decode/", inputs)
        dec_out = ab.attend_decode(db, short_slots, short_bias, split, q, k, v, k_cache, v_cache)
        # any other step: the short group, and the long group when the step has one
        gb = ab.Nodes(attrs, f"apar/l{i}/general/", inputs)
        q2 = gb.reshape(q, [s.T, gb.op("Mul", [gb.Hq, gb.D])])                    # [T, Hq * D]
        # keys @ q^T is a matrix-vector product only with one query row per block (decodes without GQA)
        short_out = ab.attend_head_major(gb, short_index, short_slots, short_bias, q2, k, v, k_cache, v_cache,
                                         few_queries=G == 1)
        # the long group only when the step has one (an If, so that other steps skip its nodes)
        lb = ab.Nodes(attrs, f"apar/l{i}/long/", inputs)
        long_out = ab.attend_head_major(lb, long_index, long_slots, long_bias, q2, k, v, k_cache, v_cache)
        nb = ab.Nodes(attrs, f"apar/l{i}/nolong/", inputs)
        none_out = nb.empty([0, attrs.num_heads, attrs.head_size], F32)
        long_if, = if_node(gb, any_long, lb, [long_out], nb, [none_out], f"l{i}/long_attention", [F32])
        gen_out = gb.op("Gather", [gb.op("Concat", [short_out, long_if], axis=0), rows], axis=0)
        out, = if_node(b, is_decode, db, [dec_out], gb, [gen_out], f"l{i}/attention", [F32])
        b.nodes.append(helper.make_node("CastLike", [out, q], [n.output[0]]))
        replaced[id(n)] = b.nodes
    new_nodes = []
    for n in g.node:   # the index math goes right before the first layer's attention
        if id(n) in replaced and top.nodes:
            new_nodes += top.nodes
            top.nodes = []
        new_nodes += replaced.get(id(n), [n])
    del g.node[:]
    g.node.extend(new_nodes)
    _declare_head_major_pools(g, {name for n in nodes for name in n.input[3:5]}, attrs)
    keep = [f for f in model.functions if (f.domain, f.name) != (OP_DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    if not any(o.domain == ab.ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ab.ORT_DOMAIN, 1))
    return len(nodes)


def _declare_head_major_pools(g, pools: set[str], attrs: AttentionAttrs) -> None:
    """Declare the graph inputs `pools` as POOL_LAYOUT (their element type kept)."""
    from onnx import helper

    for vi in g.input:
        if vi.name in pools:
            t = vi.type.tensor_type.elem_type
            vi.CopyFrom(helper.make_tensor_value_info(vi.name, t, [attrs.num_kv_heads, "pool_slots",
                                                                  attrs.head_size]))
