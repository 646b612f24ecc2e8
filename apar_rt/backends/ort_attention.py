"""`apar.TreePagedAttention` as ONNX Runtime's CPU backend runs it: a graph rewrite on load.

The engine file keeps the op's standard-op FunctionProto (any ONNX consumer can run it). On the
CPU, `rewrite(model)` replaces the op's nodes with the same math (`apar_rt.export.attention_body`)
laid out for ONNX Runtime:

- the KV pools are head-major, [Hkv, slots, D] (`POOL_LAYOUT`; the backend allocates them so),
  and each group's attention reads its context with one Gather per pool, straight into the
  layout the matmuls take (`attend_head_major`): no transpose and no concatenation of the
  context, which were two more copies of it per layer and step;
- the rewritten graph is one `If` per step, on `apar_decode`, whose other branch is an `If` on
  `apar_small` (`step_bodies`); the weights stay initializers of the main graph, which every
  body reads (one copy, prepacked once):
  - a decode step (at most one new token per sequence: the common step, APAR's too, since a
    fork's child starts with its [Child] alone) takes its attention index from the host
    (`decode_feeds`: pool slots, score bias, split), and each layer runs
    `attention_body.attend_decode`, about 20 nodes with no row gathers and constant shapes; or,
    with `native` (float32), one `ort_native` TreePagedAttention node on the step's own inputs,
    which reads each key and value where it lies in the pool instead of gathering the context
    first, and then takes the small steps too;
  - a small step (every sequence has at most SMALL_MAX_QUERY new tokens: Medusa draft trees, a
    fork's two tokens, short chunks; and padding each to the longest costs at most
    SMALL_MAX_PADDING times its tokens) also takes its index from the host, and each layer runs
    `attention_body.attend_small`: each sequence's context gathered once, its query rows as one
    matrix. A Medusa step of one 10-node tree on the demo model ran in 0.71 ms instead of the
    general branch's 0.98 (context 68), and 1.10 instead of 1.86 (context 935);
  - any other step computes its index in the graph, once per step: the short group's, and the
    long group's (prefill chunks) in a nested `If` that runs only when the step has one; each
    layer then runs the short group and, in a nested `If`, the long group.

  One If per step instead of one per layer and one for the index: a decode step's session run,
  in alternating processes, was the same within noise at batch 1 (demo +1%, hidden-512 -1%) and
  6-8% shorter at batch 8 (demo 1-5% shorter at 32).

Tested against the float64 oracle in tests/test_tree_attention.py (impl "onnx-ort").
"""

from __future__ import annotations

import functools

import numpy as np

from apar_rt.backends import ort_native
from apar_rt.backends.onnx_graph import constants, live, producers_and_uses
from apar_rt.export import attention_body as ab
from apar_rt.export.op import OP_DOMAIN, OP_INPUTS, OP_TYPE, AttentionAttrs

DECODE_INPUTS = ("apar_decode", "apar_decode_slots", "apar_decode_bias", "apar_decode_split",   # decode_feeds
                 "apar_small", "apar_small_rows", "apar_small_out_rows")
SMALL_MAX_QUERY = 64    # a small step: no sequence has more new tokens than this (a Medusa tree, a fork) ...
SMALL_MAX_PADDING = 4   # ... and its [sequences, longest query] rows are at most this many times its tokens
# decode_feeds' placeholders for the inputs a step's branch does not read (read-only)
_UNUSED = {"apar_decode": np.zeros(1, np.bool_), "apar_decode_slots": np.zeros((1, 1), np.int32),
           "apar_decode_bias": np.zeros((1, 1, 1), np.float32), "apar_decode_split": np.array([0, 1], np.int64),
           "apar_small": np.zeros(1, np.bool_), "apar_small_rows": np.zeros(1, np.int32),
           "apar_small_out_rows": np.zeros(1, np.int32)}
for _a in _UNUSED.values():
    _a.flags.writeable = False
_TRUE = np.ones(1, np.bool_)
_TRUE.flags.writeable = False
_NATIVE = dict(_UNUSED, apar_decode=_TRUE)   # a step for the native op's body: the flag alone
# With the native op, the step's slot_mapping [T] (int32) is a graph input too: the op writes the
# new keys and values into the pools itself on the steps it takes (`runs_native`).
SLOT_INPUT = "apar_slot_mapping"
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


def rewrite(model, native: bool = False) -> int:
    """Replace every `apar.TreePagedAttention` node of `model` (a ModelProto, changed in place);
    returns how many. The nodes must share their attributes and step-wide inputs (one model).

    native: a float32 model's decode body runs `ort_native`'s TreePagedAttention node on the op's
    own step inputs (the session must load that library) instead of `attend_decode`'s standard
    ops, and takes every step that `decode_feeds(..., native=True)` sends it: each sequence at
    most SMALL_MAX_QUERY new tokens."""
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
    dtype = _elem_type(g, nodes[0].input[3])
    native = native and dtype == TensorProto.FLOAT   # the native op is float32
    G = attrs.num_heads // attrs.num_kv_heads
    inputs = dict(zip(STEP_INPUTS, step_names))

    # ---- the three bodies ----
    # The graph becomes one If on apar_decode, and its else branch one If on apar_small. A decode
    # step's body runs every layer's `attend_decode` on the index that comes with the step
    # (`decode_feeds`); a small step's, `attend_small` on its own (`small_feeds`). Any other
    # step's body computes its index once, the short group's and, in a nested If that runs only
    # when the step has one, the long group's (prefill chunks); each layer then runs the short
    # group and, in a nested If, the long group. The rest of the graph is in every body; the
    # weights stay initializers of the main graph, read by all (one copy, prepacked once).
    I64, F32 = TensorProto.INT64, TensorProto.FLOAT
    decode, dec_slots, dec_bias, dec_split, small, small_rows, small_out_rows = DECODE_INPUTS

    def if_node(into: list, cond, then_b, then_outs, else_b, else_outs, tag, types) -> list[str]:
        """An If node appended to the node list `into`, its branches the nodes of `then_b` / `else_b`
        with outputs `then_outs` / `else_outs` (of element types `types`); returns its outputs."""
        names = [f"apar/{tag}_{k}" for k in range(len(types))]
        into.append(helper.make_node("If", [cond], names, name=f"apar/{tag}",
                                     then_branch=_branch(then_b.nodes, then_outs, types, f"apar_{tag}_then"),
                                     else_branch=_branch(else_b.nodes, else_outs, types, f"apar_{tag}_else")))
        return names

    def index_outs(b: ab.Nodes, gi: ab.GroupIndex) -> list[str]:
        """N, R, Qn, L, q_idx, k_idx, pool slots, bias: what a group's layer math reads. Each output
        is its own tensor: an If branch that lists one name twice confuses onnxruntime."""
        return [b.op("Identity", [gi.N]), b.op("Identity", [gi.R]), b.op("Identity", [gi.Qn]), gi.L, gi.q_idx,
                gi.k_idx, ab.pool_slots(b, gi), ab.score_bias(b, gi, G)]

    def no_index(b: ab.Nodes) -> list[str]:
        return [b.const([0]), b.const([1]), b.const([0]), b.const([0]), b.empty([0, 1], I64), b.empty([0, 0], I64),
                b.empty([0, 0], I64), b.empty([0, G, 0], F32)]

    index_types = [I64] * 7 + [F32]
    gen = ab.Nodes(attrs, "apar/general/", inputs)     # the general branch's index math
    s = ab.step_index(gen)
    sg = ab.short_group(gen, s)
    any_long = gen.op("Greater", [gen.op("ReduceMax", [gen.op("Cast", [s.is_long], to=gen.I64)], keepdims=0),
                                  gen.zero])
    mixed = ab.Nodes(attrs, "apar/long/", inputs)
    lg = ab.long_group(mixed, s)
    none = ab.Nodes(attrs, "apar/noLong/", inputs)
    long_outs = if_node(gen.nodes, any_long, mixed, index_outs(mixed, lg.index) + [ab.packed_rows(mixed, s, sg, lg)],
                        none, no_index(none) + [ab.packed_rows(none, s, sg, None)], "long", index_types + [I64])
    short_outs = index_outs(gen, sg.index)
    short_index, long_index = (ab.GroupIndex(N=o[0], R=o[1], Qn=o[2], L=o[3], K="", q_idx=o[4], k_idx=o[5],
                                             tables="", vis="") for o in (short_outs, long_outs[:8]))
    short_slots, short_bias, long_slots, long_bias = short_outs[6], short_outs[7], long_outs[6], long_outs[7]
    rows = long_outs[8]
    sm = ab.Nodes(attrs, "apar/small/", inputs)        # the small branch's shapes, once per step
    small_ix = None if native else ab.small_index(sm, small_rows, small_out_rows, dec_slots, dec_bias, dec_split)

    # ---- layer math ----
    decode_layer, small_layer, general_layer = {}, {}, {}
    producer, uses = producers_and_uses(g.node)
    consts = constants(g)
    not_in_decode: set[int] = set()    # nodes a native decode body does without (the rotary the op does)
    for i, n in enumerate(nodes):
        q, k, v, k_cache, v_cache = n.input[:5]
        # a decode step: about 20 nodes (attend_decode)
        db = ab.Nodes(attrs, f"apar/l{i}/decode/", inputs)
        flat_out = None   # a native node's output as the output projection reads it, [T, Hq * D]
        if native:   # one node that reads the pools in place (and applies q's and k's rotary)
            dec_out = db.name("native_attention")
            rq, rk = _fused_rotary(producer, uses, q), _fused_rotary(producer, uses, k)
            common = dict(domain=ort_native.OP_DOMAIN, scale=float(attrs.scale), block_size=int(attrs.block_size))
            flat_out = _flattening_reshape(g.node, uses, consts, n.output[0], attrs.num_heads * attrs.head_size)
            if flat_out is not None:   # the op writes the Reshape's output itself
                dec_out = flat_out.output[0]
                common["flat"] = 1
                not_in_decode.add(id(flat_out))
            if rq and rk and rq[1:3] == rk[1:3]:   # the op rotates: the projections in, the rotated keys out as k
                db.nodes.append(helper.make_node(
                    ort_native.ROPE_OP_TYPE, [rq[0], rk[0], v, k_cache, v_cache, *step_names, rq[1], rq[2], SLOT_INPUT],
                    [dec_out, k], num_heads=attrs.num_heads, num_kv_heads=attrs.num_kv_heads, **common))
                not_in_decode.update(id(x) for x in rq[3] + rk[3])
            else:
                db.nodes.append(helper.make_node(ort_native.OP_TYPE,
                                                 [q, k, v, k_cache, v_cache, *step_names, SLOT_INPUT],
                                                 [dec_out], **common))
        else:
            dec_out = ab.attend_decode(db, dec_slots, dec_bias, dec_split, q, k, v, k_cache, v_cache)
        # a small step (draft trees, a fork's two tokens): about 30 nodes (attend_small); native: none
        sb = ab.Nodes(attrs, f"apar/l{i}/small/", inputs)
        small_out = None if native else ab.attend_small(sb, small_ix, q, k, v, k_cache, v_cache)
        # any other step: the short group, and the long group when the step has one
        gb = ab.Nodes(attrs, f"apar/l{i}/general/", inputs)
        q2 = gb.reshape(q, [gb.dim(q, 0), gb.op("Mul", [gb.Hq, gb.D])])             # [T, Hq * D]
        # keys @ q^T is a matrix-vector product only with one query row per block (forks without GQA)
        short_out = ab.attend_head_major(gb, short_index, short_slots, short_bias, q2, k, v, k_cache, v_cache,
                                         few_queries=G == 1)
        lb = ab.Nodes(attrs, f"apar/l{i}/long/", inputs)
        long_out = ab.attend_head_major(lb, long_index, long_slots, long_bias, q2, k, v, k_cache, v_cache)
        nb = ab.Nodes(attrs, f"apar/l{i}/nolong/", inputs)
        none_out = nb.empty([0, attrs.num_heads, attrs.head_size], F32)
        long_if, = if_node(gb.nodes, any_long, lb, [long_out], nb, [none_out], f"l{i}/long_attention", [F32])
        gen_out = gb.op("Gather", [gb.op("Concat", [short_out, long_if], axis=0), rows], axis=0)
        for b, out, into in ((db, dec_out, decode_layer), (sb, small_out, small_layer), (gb, gen_out, general_layer)):
            if out is None:
                continue
            if b is db and flat_out is not None:
                into[id(n)] = b.nodes
                continue
            b.nodes.append(helper.make_node("Identity", [out], [n.output[0]]) if dtype == TensorProto.FLOAT
                           else helper.make_node("Cast", [out], [n.output[0]], to=dtype))
            into[id(n)] = b.nodes
    decode_nodes: list = []
    small_nodes: list = []
    general_nodes: list = []
    index, shapes = gen.nodes, sm.nodes
    for n in g.node:
        if id(n) in decode_layer:
            general_nodes += index    # the index math goes right before the first layer's attention
            small_nodes += shapes
            index = shapes = []
            decode_nodes += decode_layer[id(n)]
            small_nodes += small_layer.get(id(n), [])
            general_nodes += general_layer[id(n)]
        else:
            if id(n) not in not_in_decode:
                decode_nodes.append(n)
            small_nodes.append(n)
            general_nodes.append(n)
    outs = [(o.name, o.type.tensor_type.elem_type) for o in g.output]
    # nodes left unread (the tables the rotary fusion took halves of; a native body's rotary
    # position ids) are dropped: onnxruntime would run them
    graph_outs = {name for name, _ in outs}
    decode_nodes, general_nodes = live(decode_nodes, graph_outs)[0], live(general_nodes, graph_outs)[0]
    if native:   # the native body also takes the small steps: one If, on apar_decode
        other_body = _body(general_nodes, outs, "apar/anyStep/")
    else:
        small_nodes = live(small_nodes, graph_outs)[0]
        not_decode = [("apar/notDecode/" + name, t) for name, t in outs]
        other = helper.make_node("If", [small], [name for name, _ in not_decode], name="apar/notDecode",
                                 then_branch=_body(small_nodes, outs, "apar/smallStep/"),
                                 else_branch=_body(general_nodes, outs, "apar/anyStep/"))
        other_body = _branch([other], [name for name, _ in not_decode], [t for _, t in not_decode], "apar_notDecode")
    step = helper.make_node("If", [decode], [name for name, _ in outs], name="apar/step",
                            then_branch=_body(decode_nodes, outs, "apar/decodeStep/"), else_branch=other_body)
    del g.node[:]
    g.node.append(step)
    _declare_head_major_pools(g, {name for n in nodes for name in n.input[3:5]}, attrs)
    _declare_decode_inputs(g)
    if native:
        g.input.append(helper.make_tensor_value_info(SLOT_INPUT, TensorProto.INT32, ["T"]))
    keep = [f for f in model.functions if (f.domain, f.name) != (OP_DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    for domain in (ab.ORT_DOMAIN,) + ((ort_native.OP_DOMAIN,) if native else ()):
        if not any(o.domain == domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(domain, 1))
    return len(nodes)


def _flattening_reshape(nodes, uses: dict, consts: dict, name: str, width: int):
    """The one node reading `name` when it is a Reshape to the constant shape [-1, width], else None."""
    if uses.get(name) != 1:
        return None
    reader = next(n for n in nodes if name in n.input)
    shape = consts.get(reader.input[1]) if reader.op_type == "Reshape" and reader.input[0] == name else None
    return reader if shape is not None and shape.tolist() == [-1, width] else None


def _fused_rotary(producer: dict, uses: dict, name: str):
    """(projection, cos, sin, its three nodes) when `name` is `ort_rotary.fuse_rotary`'s output,
    Reshape(RotaryEmbedding(Unsqueeze(projection), position ids 0..T-1, cos, sin)), and nothing
    but the attention node reads any of the three outputs; else None."""
    from apar_rt.backends import ort_rotary

    reshape = producer.get(name)
    rot = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    if rot is None or (rot.domain, rot.op_type) != ("com.microsoft", "RotaryEmbedding") \
            or rot.input[1] != ort_rotary.PREFIX + "positions" \
            or any(a.name == "interleaved" and a.i for a in rot.attribute):
        return None
    unsq = producer.get(rot.input[0])
    if unsq is None or unsq.op_type != "Unsqueeze" or any(uses.get(x.output[0]) != 1 for x in (reshape, rot, unsq)):
        return None
    return unsq.input[0], rot.input[2], rot.input[3], [reshape, rot, unsq]


def step_bodies(g) -> list:
    """The bodies of a rewritten graph `g` (a GraphProto), each the whole model for one kind of
    step: [decode, small, general], the branches of the step's Ifs ([native, general] for a graph
    rewritten with native=True)."""
    if len(g.node) == 1 and g.node[0].op_type == "If":
        branches = {a.name: a.g for a in g.node[0].attribute}   # stored in name order: else first
        return step_bodies(branches["then_branch"]) + step_bodies(branches["else_branch"])
    return [g]


def _branch(nodes: list, outs: list[str], types: list[int], name: str):
    """An If branch: the graph of `nodes` whose outputs are `outs` (element types `types`)."""
    from onnx import helper

    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])


def _body(nodes: list, outs: list[tuple[str, int]], prefix: str):
    """A branch of the step's If: `nodes` (main-graph nodes, copied) with every name in `outs`
    (the graph outputs, (name, element type)) renamed to `prefix` + name, at any depth, so that
    no name inside shadows the If's own outputs."""
    from onnx import NodeProto

    renamed = {name: prefix + name for name, _ in outs}

    def rename(node):
        node = NodeProto.FromString(node.SerializeToString())
        _rename_node(node, renamed)
        return node

    return _branch([rename(n) for n in nodes], [renamed[n] for n, _ in outs], [t for _, t in outs],
                   prefix.strip("/").replace("/", "_"))


def _rename_node(node, renamed: dict) -> None:
    """Rename the inputs and outputs of `node` and of its subgraphs' nodes (in place)."""
    for field in (node.input, node.output):
        for k, name in enumerate(field):
            if name in renamed:
                field[k] = renamed[name]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for n in sub.node:
                _rename_node(n, renamed)
            for o in sub.output:
                if o.name in renamed:
                    o.name = renamed[o.name]


def _declare_head_major_pools(g, pools: set[str], attrs: AttentionAttrs) -> None:
    """Declare the graph inputs `pools` as POOL_LAYOUT (their element type kept)."""
    from onnx import helper

    for vi in g.input:
        if vi.name in pools:
            t = vi.type.tensor_type.elem_type
            vi.CopyFrom(helper.make_tensor_value_info(vi.name, t, [attrs.num_kv_heads, "pool_slots",
                                                                  attrs.head_size]))


def _elem_type(g, name: str) -> int:
    """The element type of graph input `name` (a pool: the engine's dtype)."""
    for vi in g.input:
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    raise ValueError(f"{name!r} is not a graph input")


def _declare_decode_inputs(g) -> None:
    """Declare DECODE_INPUTS as graph inputs (what `decode_feeds` gives)."""
    from onnx import TensorProto, helper

    shapes = {"apar_decode": (TensorProto.BOOL, [1]), "apar_decode_slots": (TensorProto.INT32, ["S", "L"]),
              "apar_decode_bias": (TensorProto.FLOAT, ["S", "Q", "K"]), "apar_decode_split": (TensorProto.INT64, [2]),
              "apar_small": (TensorProto.BOOL, [1]), "apar_small_rows": (TensorProto.INT32, ["R"]),
              "apar_small_out_rows": (TensorProto.INT32, ["T"])}
    g.input.extend(helper.make_tensor_value_info(name, *shapes[name]) for name in DECODE_INPUTS)


@functools.lru_cache(maxsize=256)
def _arange(n: int):
    """np.arange(n) as int32, read-only (shared)."""
    a = np.arange(n, dtype=np.int32)
    a.flags.writeable = False
    return a


def _context_slots(tables, ctx, block_size: int):
    """(slots [S, L], L): each row's pool slots of context positions 0..L-1 through its block table,
    L the longest context `ctx` rounded up to whole blocks."""
    nblk = -(-int(ctx.max()) // block_size)
    L = nblk * block_size
    return (tables[:, :nblk, None] * np.int32(block_size) + _arange(block_size)).reshape(len(ctx), L), L


def runs_native(feeds: dict) -> bool:
    """Whether `decode_feeds` sent the step to the native op's body (which writes its K/V itself)."""
    return feeds is _NATIVE


def decode_feeds(block_tables, context_lens, query_start, mask, block_size: int, small: bool = True,
                 native: bool = False) -> dict:
    """The rewritten graph's DECODE_INPUTS for one step (numpy; its other inputs as `step_io`
    packs them, padding sequences included). They pick the step's branch and carry its index:

    - a decode step (every sequence has at most one new token) takes its attention index from
      these instead of computing it in about 55 nodes: the T sequences with a token, in order
      (token t is the t-th one's), and L, the longest context rounded up to whole blocks.
      - apar_decode [1]: True;
      - apar_decode_slots [T, L]: the pool slot of each context position, through the block table;
      - apar_decode_bias [T, 1, L+1]: 0 where the token sees the key, float32's lowest elsewhere:
        context positions below its context length, then the token itself (mask[t, 0]);
      - apar_decode_split [2]: (L, 1).
    - a small step (`small_feeds`; with `small`) has apar_small True, and the same three inputs
      in the small layout, with its rows.
    - on any other step both flags are False and the rest are placeholders the graph does not read.
    - with `native` (a graph rewritten with native=True), a step whose sequences have at most
      SMALL_MAX_QUERY new tokens each has apar_decode True and placeholders for the rest: the
      native op reads the step's own inputs.
    The arguments are numpy arrays (block_tables and context_lens int32, as `step_io` packs them).
    """
    if native:   # the mask has a column per new token of the longest query: its width bounds them all
        if mask.shape[1] <= SMALL_MAX_QUERY or int(np.diff(query_start).max(initial=0)) <= SMALL_MAX_QUERY:
            return _NATIVE
        return _UNUSED
    ctx, tables = context_lens, block_tables
    if mask.shape[1] > 1 or len(mask) != len(ctx):   # not every sequence has exactly one new token
        q_len = np.diff(query_start)
        if q_len.max() > 1:
            got = small_feeds(block_tables, context_lens, query_start, mask, block_size) if small else None
            return _UNUSED if got is None else got
        seq = np.flatnonzero(q_len)
        ctx, tables = ctx[seq], tables[seq]
    slots, L = _context_slots(tables, ctx, block_size)
    vis = _arange(L + 1) < ctx[:, None]
    vis[:, L] = mask[:, 0]
    bias = np.where(vis, np.float32(0), np.float32(ab.FLOAT32_LOWEST))[:, None, :]
    return dict(_UNUSED, apar_decode=_TRUE, apar_decode_slots=slots, apar_decode_bias=bias,
                apar_decode_split=np.array([L, 1], np.int64))


def small_feeds(block_tables, context_lens, query_start, mask, block_size: int) -> dict | None:
    """A small step's DECODE_INPUTS, or None when the step is not small (a long chunk, or
    sequences whose query lengths differ so much that padding them to the longest costs more
    than SMALL_MAX_PADDING times the step's tokens).

    With B the sequences that have new tokens, Q the longest query and L the longest context
    rounded up to whole blocks (`ab.attend_small` reads them so):
    - apar_small [1]: True (apar_decode False);
    - apar_small_rows [B*Q]: row j of sequence i is its j-th new token's packed row (padding
      rows repeat its first token);
    - apar_small_out_rows [T]: each packed token's place i*Q + j in that layout;
    - apar_decode_slots [B, L]: each sequence's context slots, through its block table;
    - apar_decode_bias [B, Q, L+Q]: 0 where query j sees the key, float32's lowest elsewhere:
      context positions below the sequence's context length, then its new tokens as `mask` says;
    - apar_decode_split [2]: (L, Q)."""
    q_len = np.diff(query_start)
    seq = np.flatnonzero(q_len)
    Q, B, T = int(q_len.max()), len(seq), int(query_start[-1])
    if Q > SMALL_MAX_QUERY or B * Q > SMALL_MAX_PADDING * T:
        return None
    if B == len(q_len):   # no padding sequence
        n, first, ctx, tables = q_len, query_start[:-1], context_lens, block_tables
    else:
        n, first = q_len[seq], query_start[seq]
        ctx, tables = context_lens[seq], block_tables[seq]
    j = _arange(Q)
    slots, L = _context_slots(tables, ctx, block_size)
    vis = np.empty((B, Q, L + Q), np.bool_)
    vis[:, :, :L] = (_arange(L) < ctx[:, None])[:, None, :]
    if B * Q == T:        # every sequence has Q tokens (draft trees of one shape, one chunk): no padding row
        rows = (first[:, None] + j).reshape(-1)
        out_rows = _arange(T)
        vis[:, :, L:] = mask[:, :Q].reshape(B, Q, Q)
    else:
        valid = j < n[:, None]                                                     # [B, Q]
        rows = np.where(valid, first[:, None] + j, first[:, None]).reshape(-1)
        out_rows = (_arange(B)[:, None] * Q + j)[valid]
        vis[:, :, L:] = mask[rows, :Q].reshape(B, Q, Q) & valid[:, None, :] & valid[:, :, None]
    bias = np.where(vis, np.float32(0), np.float32(ab.FLOAT32_LOWEST))
    return dict(_UNUSED, apar_small=_TRUE, apar_small_rows=rows.astype(np.int32, copy=False),
                apar_small_out_rows=out_rows, apar_decode_slots=slots, apar_decode_bias=bias,
                apar_decode_split=np.array([L, Q], np.int64))
