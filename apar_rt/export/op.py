"""`apar.TreePagedAttention` in ONNX: the one place that names the op, and its standard-op body.

The node carries the attributes a TensorRT plugin creator reads (head counts, head size, block
size, scale) plus `plugin_namespace`/`plugin_version`, which the TensorRT ONNX parser uses to
find our plugin. The model also carries a model-local FunctionProto of the same domain and name,
written only in default-domain ONNX ops, that computes exactly the reference
(`apar_rt.ops.tree_attention.tree_paged_attention_reference`): ONNX Runtime (and TensorRT
without the plugin) inline it.
"""

from __future__ import annotations

from dataclasses import dataclass

OP_DOMAIN = "apar"
OP_TYPE = "TreePagedAttention"
OP_DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "apar"
PLUGIN_VERSION = "1"
# The op's inputs and output, in order (the reference's argument order).
OP_INPUTS = ("q", "k", "v", "k_cache", "v_cache", "block_tables", "context_lens", "query_start", "mask")
OP_OUTPUTS = ("out",)
# Node attributes: (name, ONNX attribute kind). Ints and floats are the plugin's fields.
OP_ATTRIBUTES = (("plugin_namespace", "s"), ("plugin_version", "s"), ("num_heads", "i"),
                 ("num_kv_heads", "i"), ("head_size", "i"), ("block_size", "i"), ("scale", "f"))


@dataclass(frozen=True, slots=True)
class AttentionAttrs:
    """The values of one TreePagedAttention node's attributes."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    scale: float

    def as_dict(self) -> dict:
        return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "head_size": self.head_size, "block_size": self.block_size, "scale": float(self.scale)}


def make_symbolic(attrs: AttentionAttrs):
    """A TorchScript-exporter symbolic for `apar::tree_paged_attention` emitting our node.

    The scale comes from the traced call; the other attributes from the model config.
    """

    def symbolic(g, q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, scale):
        from torch.onnx import symbolic_helper

        s = symbolic_helper._maybe_get_const(scale, "f")
        d = attrs.as_dict()
        out = g.op(f"{OP_DOMAIN}::{OP_TYPE}", q, k, v, k_cache, v_cache, block_tables, context_lens,
                   query_start, mask,
                   plugin_namespace_s=d["plugin_namespace"], plugin_version_s=d["plugin_version"],
                   num_heads_i=d["num_heads"], num_kv_heads_i=d["num_kv_heads"], head_size_i=d["head_size"],
                   block_size_i=d["block_size"], scale_f=float(s))
        out.setType(q.type())
        return out

    return symbolic


# Query rows per tile in the long group; sequences with at most SHORT_MAX new tokens (decodes, a
# fork's [Fork][Child], small drafts) form the short group, padded only among themselves.
SHORT_MAX = 2
TILE = 32


def attention_function(opset: int):
    """The model-local FunctionProto `apar.TreePagedAttention`, in default-domain ops only.

    Computes the reference's function with a cost that follows each sequence's own query length
    instead of padding every sequence to the step's longest one. The B sequences fall in two
    groups, and each group runs the same masked attention over its own padded shapes:

    - short (1 to SHORT_MAX new tokens: decodes, a fork's two tokens): one row-block per
      sequence, padded to the group's longest query and context;
    - long (prefill chunks, draft trees): tiles of TILE consecutive new tokens of one sequence;
      each tile sees its sequence's context and all of its new tokens.

    Sequences with no new tokens (bucket padding) are in neither group. A mixed step of n
    decodes and a prefill chunk of P tokens thus costs about n x ctx + P x (ctx + P), the sum of
    its parts, instead of (n + 1) x P x (L + P). Keys are read through the block tables up to the
    group's longest context only, not the tables' full width.

    All index math reads only the step inputs shared by every layer (block_tables,
    context_lens, query_start, mask) and the node's attributes, so after inlining ONNX Runtime's
    common-subexpression elimination computes it once per step. Softmax runs in float32 over
    scores masked with float32's lowest value; unlike the reference, unseen slots are not zeroed
    (the contract keeps pool contents finite, so their probability of exactly 0 removes them).
    Rows of padding compute finite garbage that no token reads.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes: list = []
    counter = [0]
    I64, F32 = TensorProto.INT64, TensorProto.FLOAT

    def op(op_type, inputs, n_out=1, **attrs):
        counter[0] += 1
        outs = [f"{op_type.lower()}_{counter[0]}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(name, values, dtype=I64):
        nodes.append(helper.make_node("Constant", [], [name],
                                      value=helper.make_tensor(name, dtype, [len(values)], values)))
        return name

    def scalar(name, value, dtype):
        nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value])))
        return name

    def attr_const(name, kind, attr_kind):
        node = helper.make_node("Constant", [], [f"{name}_c"])
        node.attribute.append(helper.make_attribute_ref(kind, attr_kind, ref_attr_name=name))
        nodes.append(node)
        return f"{name}_c"

    i0, i1, i2, i3 = (const(f"c{i}", [i]) for i in range(4))
    zero, one = scalar("zero", 0, I64), scalar("one", 1, I64)
    fmin = scalar("fmin", float.fromhex("-0x1.fffffep+127"), F32)  # float32's lowest
    minus1, big = const("cm1", [-1]), const("cbig", [2 ** 62])
    short_max, tile = const("cshort", [SHORT_MAX]), const("ctile", [TILE])
    scale = attr_const("scale", "value_float", onnx.AttributeProto.FLOAT)

    def attr_int(name):  # a [1] int64 tensor from the node's int attribute `name`
        return op("Unsqueeze", [attr_const(name, "value_int", onnx.AttributeProto.INT), i0])

    def dim(x, axis):  # a [1] int64 tensor holding x.shape[axis]
        return op("Shape", [x], start=axis, end=axis + 1)

    def sq(x):  # [1] -> scalar
        return op("Squeeze", [x, i0])

    def arange(n1):  # 0 .. n-1 from a [1] tensor n
        return op("Range", [zero, sq(n1), one])

    def col(x):  # [n] -> [n, 1]
        return op("Unsqueeze", [x, i1])

    def row(x):  # [n] -> [1, n]
        return op("Unsqueeze", [x, i0])

    def reshape(x, dims):
        return op("Reshape", [x, op("Concat", list(dims), axis=0)], allowzero=1)

    def rank_of(ends, idx):  # for each idx, the number of `ends` entries <= it: [n]
        le = op("LessOrEqual", [row(ends), col(idx)])
        return op("ReduceSum", [op("Cast", [le], to=I64), i1], keepdims=0)

    def group_max(flag, x):  # [1]: max of x over the sequences where flag (0 if none)
        return op("ReduceMax", [op("Where", [flag, x, zero])], keepdims=1)

    def ceil_div(a, b):
        return op("Div", [op("Add", [a, op("Sub", [b, i1])]), b])

    Hq, Hkv, D, BS = (attr_int(a) for a in ("num_heads", "num_kv_heads", "head_size", "block_size"))
    group = op("Div", [Hq, Hkv])
    T = dim("mask", 0)
    t_last = op("Max", [op("Sub", [T, i1]), i0])

    qs = op("Cast", ["query_start"], to=I64)
    q_start = op("Slice", [qs, i0, minus1, i0])                       # [B]
    q_end = op("Slice", [qs, i1, big, i0])                            # [B]
    q_len = op("Sub", [q_end, q_start])
    ctx = op("Cast", ["context_lens"], to=I64)
    is_short = op("And", [op("Greater", [q_len, zero]), op("LessOrEqual", [q_len, short_max])])
    is_long = op("Greater", [q_len, short_max])

    def attend(flag, seq, q0, rows, keys_new):
        """Masked attention for N row-blocks of `rows` query rows each.

        seq [N]: each block's sequence; q0 [N]: its first new-token offset in that sequence;
        rows [1]: rows per block; keys_new [1]: how many of the sequence's new tokens each
        block may see (its group's longest query). Returns [N * rows, Hq, D] float32.
        """
        s_start, s_len, s_ctx = (op("Gather", [x, seq], axis=0) for x in (q_start, q_len, ctx))
        r = arange(rows)
        jq = op("Add", [col(q0), row(r)])                                  # [N, R] offsets in seq
        q_idx = op("Min", [op("Add", [col(s_start), jq]), t_last])         # [N, R] packed rows
        jk = arange(keys_new)
        k_idx = op("Min", [op("Add", [col(s_start), row(jk)]), t_last])    # [N, Qn] new-key rows
        k_ok = op("Less", [row(jk), col(s_len)])                           # [N, Qn]
        nblk = ceil_div(group_max(flag, ctx), BS)                          # [1] cached blocks read
        L = op("Mul", [nblk, BS])
        tables = op("Gather", [op("Slice", ["block_tables", i0, nblk, i1]), seq], axis=0)   # [N, nblk]
        N = dim(seq, 0)
        kv = []
        for cache, new in (("k_cache", "k"), ("v_cache", "v")):
            cached = reshape(op("Gather", [cache, tables], axis=0), [N, L, Hkv, D])
            both = op("Concat", [cached, op("Gather", [new, k_idx], axis=0)], axis=1)   # [N, K, Hkv, D]
            kv.append(op("Cast", [op("Transpose", [both], perm=[0, 2, 1, 3])], to=F32))  # [N, Hkv, K, D]
        keys, vals = kv
        # visibility [N, 1, R, 1, K]: cached positions < ctx, then the mask over new tokens
        ctx_vis = op("Less", [row(arange(L)), col(s_ctx)])                 # [N, L]
        ctx_vis = op("Expand", [op("Unsqueeze", [ctx_vis, i1]), op("Concat", [N, rows, L], axis=0)])
        new_vis = op("Slice", [op("Gather", ["mask", q_idx], axis=0), i0, keys_new, i2])   # [N, R, Qn]
        new_vis = op("And", [new_vis, op("Unsqueeze", [k_ok, i1])])
        vis = op("Unsqueeze", [op("Concat", [ctx_vis, new_vis], axis=2), op("Concat", [i1, i3], axis=0)])
        # queries [N, Hkv, R*G, D], query head h = kv * G + g
        qp = op("Cast", [op("Gather", ["q", q_idx], axis=0)], to=F32)      # [N, R, Hq, D]
        qp = op("Transpose", [reshape(qp, [N, rows, Hkv, group, D])], perm=[0, 2, 1, 3, 4])
        qp = reshape(op("Mul", [qp, scale]), [N, Hkv, op("Mul", [rows, group]), D])
        scores = op("MatMul", [qp, op("Transpose", [keys], perm=[0, 1, 3, 2])])    # [N, Hkv, R*G, K]
        K = dim(scores, 3)
        scores = op("Where", [vis, reshape(scores, [N, Hkv, rows, group, K]), fmin])
        probs = reshape(op("Softmax", [scores], axis=-1), [N, Hkv, op("Mul", [rows, group]), K])
        out = reshape(op("MatMul", [probs, vals]), [N, Hkv, rows, group, D])
        out = op("Transpose", [out], perm=[0, 2, 1, 3, 4])                 # [N, R, Hkv, G, D]
        return reshape(out, [op("Mul", [N, rows]), Hq, D])

    # short group: one block per sequence, rows = the group's longest query
    short_n = op("Cast", [is_short], to=I64)
    short_end = op("CumSum", [short_n, zero])                           # inclusive
    n_short = op("ReduceSum", [short_n], keepdims=1)
    q_short = op("Max", [group_max(is_short, q_len), i1])
    short_seq = rank_of(short_end, arange(n_short))                     # [Ns]
    out_short = attend(is_short, short_seq, op("Mul", [short_seq, zero]), q_short, q_short)

    # long group: tiles of TILE rows
    tiles = op("Where", [is_long, ceil_div(q_len, tile), zero])         # [B] tiles per sequence
    tile_end = op("CumSum", [tiles, zero])
    tile_begin = op("Sub", [tile_end, tiles])
    tile_ids = arange(op("ReduceSum", [tiles], keepdims=1))
    tile_seq = rank_of(tile_end, tile_ids)                              # [NT]
    tile_q0 = op("Mul", [op("Sub", [tile_ids, op("Gather", [tile_begin, tile_seq], axis=0)]), tile])
    q_long = group_max(is_long, q_len)
    out_long = attend(is_long, tile_seq, tile_q0, tile, q_long)

    # back to packed order: token t of sequence b at offset j is row rank*Qs + j (short) or
    # Ns*Qs + tile_begin*TILE + j (long)
    t = arange(T)
    seq = rank_of(q_end, t)                                             # [T]
    j = op("Sub", [t, op("Gather", [q_start, seq], axis=0)])
    short_row = op("Add", [op("Mul", [op("Gather", [op("Sub", [short_end, short_n]), seq], axis=0),
                                      q_short]), j])
    long_row = op("Add", [op("Mul", [n_short, q_short]),
                          op("Add", [op("Mul", [op("Gather", [tile_begin, seq], axis=0), tile]), j])])
    rows = op("Where", [op("Gather", [is_short, seq], axis=0), short_row, long_row])
    both = op("Concat", [out_short, out_long], axis=0)
    nodes.append(helper.make_node("CastLike", [op("Gather", [both, rows], axis=0), "q"], ["out"]))

    return helper.make_function(
        OP_DOMAIN, OP_TYPE, list(OP_INPUTS), list(OP_OUTPUTS), nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=[name for name, _ in OP_ATTRIBUTES])


def all_nodes(function) -> list:
    """Every node of a FunctionProto, those inside If branches included."""
    out, todo = [], list(function.node)
    while todo:
        n = todo.pop()
        out.append(n)
        for a in n.attribute:
            todo += [x for g in ([a.g] if a.HasField("g") else []) + list(a.graphs) for x in g.node]
    return out


def standard_op_types(function) -> set[tuple[str, str]]:
    """(domain, op_type) of every node in a FunctionProto, If branches included (checks, tests)."""
    return {(n.domain, n.op_type) for n in all_nodes(function)}


def attention_model(attrs: AttentionAttrs, dtype: str = "float32", opset: int = 18):
    """A model of one `apar.TreePagedAttention` node plus its local function (tests, benchmarks).

    Its inputs and output are the op's, named as in OP_INPUTS; q/k/v and the pools have `dtype`.
    """
    from onnx import TensorProto, helper

    ft = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    i32, b = TensorProto.INT32, TensorProto.BOOL
    H, Hkv, D = attrs.num_heads, attrs.num_kv_heads, attrs.head_size
    shapes = {"q": (ft, ["T", H, D]), "k": (ft, ["T", Hkv, D]), "v": (ft, ["T", Hkv, D]),
              "k_cache": (ft, ["NB", attrs.block_size, Hkv, D]), "v_cache": (ft, ["NB", attrs.block_size, Hkv, D]),
              "block_tables": (i32, ["B", "MB"]), "context_lens": (i32, ["B"]), "query_start": (i32, ["B1"]),
              "mask": (b, ["T", "MQ"])}
    inputs = [helper.make_tensor_value_info(n, *shapes[n]) for n in OP_INPUTS]
    node = helper.make_node(OP_TYPE, list(OP_INPUTS), ["out"], domain=OP_DOMAIN, **attrs.as_dict())
    graph = helper.make_graph([node], "tree_paged_attention", inputs,
                              [helper.make_tensor_value_info("out", ft, ["T", H, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(OP_DOMAIN, OP_DOMAIN_VERSION)],
                              functions=[attention_function(opset)])
    model.ir_version = 9
    return model
