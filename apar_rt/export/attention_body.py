"""The ONNX node math of `apar.TreePagedAttention`, written once for its two ONNX bodies.

* `apar_rt.export.op.attention_function`: the model-local FunctionProto in default-domain ops
  that every ONNX consumer (ONNX Runtime, TensorRT without our plugin) can inline;
* `apar_rt.backends.ort_attention`: the graph ONNX Runtime's CPU backend runs instead, over
  head-major pools (`attend_head_major`) and with a decode fast path.

Both compute exactly the reference (`apar_rt.ops.tree_attention.tree_paged_attention_reference`)
with a cost that follows each sequence's own query length: the B sequences fall in two groups,
and each group runs the same masked attention over its own padded shapes:

- short (1 to SHORT_MAX new tokens: decodes, a fork's two tokens): one row-block per sequence,
  padded to the group's longest query and context;
- long (prefill chunks, draft trees): tiles of consecutive new tokens of one sequence; each tile
  sees its sequence's context and all of its new tokens. When one tile of the longest one's rows
  per sequence pads the group at most 2x (a step's prefill chunk, or chunks of similar lengths),
  that is the tiling, so each sequence's keys are gathered once; otherwise tiles of TILE rows,
  so that short ones (draft trees) are not padded to a long chunk.

Sequences with no new tokens (bucket padding) are in neither group. A mixed step of n decodes and
a prefill chunk of P tokens thus costs about n x ctx + P x (ctx + P), the sum of its parts. Keys
are read through the block tables up to the group's longest context only.

The math splits in two parts: *index math* reads only the step inputs shared by every layer
(block_tables, context_lens, query_start, mask) and the attributes; *layer math* reads one
layer's q, k, v and pools. Softmax runs in float32 over scores masked with float32's lowest
value; unlike the reference, unseen slots are not zeroed (the contract keeps pool contents
finite, so their probability of exactly 0 removes them). Rows of padding compute finite garbage
that no token reads.
"""

from __future__ import annotations

from dataclasses import dataclass

# Sequences with at most SHORT_MAX new tokens (decodes, a fork's [Fork][Child], small drafts) form
# the short group, padded only among themselves; longer ones are cut into tiles of TILE rows.
SHORT_MAX = 2
TILE = 32
ORT_DOMAIN = "com.microsoft"      # ONNX Runtime's contrib ops (its CPU graph only)
FLOAT32_LOWEST = float.fromhex("-0x1.fffffep+127")


class Nodes:
    """Appends ONNX nodes with unique output names (`prefix` + a counter) to `self.nodes`.

    attrs: None inside the FunctionProto (head counts, head size, block size and scale are
    references to the node's attributes), or an `AttentionAttrs` whose values become constants.
    inputs: the names of the step-wide inputs (block_tables, context_lens, query_start, mask)
    when they differ from the op's own input names.
    """

    def __init__(self, attrs=None, prefix: str = "", inputs: dict | None = None) -> None:
        from onnx import TensorProto

        self.nodes: list = []
        self.attrs = attrs
        self.prefix = prefix
        self.inputs = inputs or {}
        self._n = 0
        self.I64, self.F32 = TensorProto.INT64, TensorProto.FLOAT
        self.i0, self.i1, self.i2, self.i3 = (self.const([i]) for i in range(4))
        self.zero, self.one = self.scalar(0, self.I64), self.scalar(1, self.I64)
        self.fmin, self.fzero = self.scalar(FLOAT32_LOWEST, self.F32), self.scalar(0.0, self.F32)
        self.Hq, self.Hkv, self.D, self.BS = (self.attr_int(a) for a in
                                              ("num_heads", "num_kv_heads", "head_size", "block_size"))
        self.group = self.op("Div", [self.Hq, self.Hkv])

    def inp(self, name: str) -> str:
        """The graph name of the op's step-wide input `name`."""
        return self.inputs.get(name, name)

    def name(self, kind: str) -> str:
        self._n += 1
        return f"{self.prefix}{kind}_{self._n}"

    def op(self, op_type: str, inputs, **attrs) -> str:
        from onnx import helper

        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def constant(self, kind: str, dtype, dims, values) -> str:
        """A Constant node of element type `dtype`, shape `dims`, holding `values`."""
        from onnx import helper

        out = self.name(kind)
        self.nodes.append(helper.make_node("Constant", [], [out],
                                           value=helper.make_tensor(out, dtype, dims, values)))
        return out

    def const(self, values, dtype=None) -> str:   # a 1-D tensor, int64 by default
        return self.constant("const", self.I64 if dtype is None else dtype, [len(values)], values)

    def scalar(self, value, dtype) -> str:
        return self.constant("scalar", dtype, [], [value])

    def empty(self, dims, dtype) -> str:
        """A constant tensor of shape `dims` with no elements (one dimension is 0)."""
        return self.constant("empty", dtype, dims, [])

    def _attr_ref_const(self, name: str, kind: str, attr_kind) -> str:
        from onnx import helper

        out = self.name(name)
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref(kind, attr_kind, ref_attr_name=name))
        self.nodes.append(node)
        return out

    def attr_int(self, name: str) -> str:
        """A [1] int64 tensor holding the node's int attribute `name`."""
        import onnx

        if self.attrs is not None:
            return self.const([int(getattr(self.attrs, name))])
        ref = self._attr_ref_const(name, "value_int", onnx.AttributeProto.INT)
        return self.op("Unsqueeze", [ref, self.i0])

    def scale(self) -> str:
        import onnx

        if self.attrs is not None:
            return self.scalar(float(self.attrs.scale), self.F32)
        return self._attr_ref_const("scale", "value_float", onnx.AttributeProto.FLOAT)

    def fused_matmul_t(self, a: str, b: str, alpha: float) -> str:
        """com.microsoft.FusedMatMul: alpha * a @ b^T over the last two axes (no transpose of b)."""
        from onnx import helper

        out = self.name("qk")
        self.nodes.append(helper.make_node("FusedMatMul", [a, b], [out], domain=ORT_DOMAIN, transB=1,
                                           alpha=float(alpha)))
        return out

    # ---- small shape helpers ----

    def dim(self, x: str, axis: int) -> str:  # a [1] int64 tensor holding x.shape[axis]
        return self.op("Shape", [x], start=axis, end=axis + 1)

    def arange(self, n1: str) -> str:  # 0 .. n-1 from a [1] tensor n
        return self.op("Range", [self.zero, self.op("Squeeze", [n1, self.i0]), self.one])

    def col(self, x: str) -> str:  # [n] -> [n, 1]
        return self.op("Unsqueeze", [x, self.i1])

    def row(self, x: str) -> str:  # [n] -> [1, n]
        return self.op("Unsqueeze", [x, self.i0])

    def reshape(self, x: str, dims) -> str:
        return self.op("Reshape", [x, self.op("Concat", list(dims), axis=0)], allowzero=1)

    def rank_of(self, ends: str, idx: str) -> str:  # for each idx, the number of `ends` entries <= it
        le = self.op("LessOrEqual", [self.row(ends), self.col(idx)])
        return self.op("ReduceSum", [self.op("Cast", [le], to=self.I64), self.i1], keepdims=0)

    def group_max(self, flag: str, x: str) -> str:  # [1]: max of x where flag (0 if none)
        return self.op("ReduceMax", [self.op("Where", [flag, x, self.zero])], keepdims=1)

    def ceil_div(self, a: str, b: str) -> str:
        return self.op("Div", [self.op("Add", [a, self.op("Sub", [b, self.i1])]), b])


@dataclass
class StepIndex:
    """Index math shared by every layer: the step's per-sequence facts and group flags."""

    T: str            # [1] new tokens in the step
    t_last: str       # [1] max(T - 1, 0)
    q_start: str      # [B] first packed row of each sequence
    q_end: str        # [B]
    q_len: str        # [B] new tokens of each sequence
    ctx: str          # [B] cached context of each sequence
    is_short: str     # [B] bool
    is_long: str      # [B] bool


@dataclass
class GroupIndex:
    """One group's index math: N row-blocks of R query rows each."""

    N: str            # [1] row-blocks
    R: str            # [1] query rows per block
    Qn: str           # [1] new-token keys each block may see
    L: str            # [1] cached keys read (the group's longest context, whole blocks)
    K: str            # [1] keys per row: L + Qn
    q_idx: str        # [N, R] packed query rows
    k_idx: str        # [N, Qn] packed new-key rows
    tables: str       # [N, nblk] block tables, cut to the blocks read
    vis: str          # [N, 1, R, 1, K] bool: cached positions < ctx, then the mask over new tokens


def step_index(b: Nodes) -> StepIndex:
    qs = b.op("Cast", [b.inp("query_start")], to=b.I64)
    q_start = b.op("Slice", [qs, b.i0, b.const([-1]), b.i0])
    q_end = b.op("Slice", [qs, b.i1, b.const([2 ** 62]), b.i0])
    q_len = b.op("Sub", [q_end, q_start])
    T = b.dim(b.inp("mask"), 0)
    short_max = b.const([SHORT_MAX])
    return StepIndex(
        T=T, t_last=b.op("Max", [b.op("Sub", [T, b.i1]), b.i0]), q_start=q_start, q_end=q_end, q_len=q_len,
        ctx=b.op("Cast", [b.inp("context_lens")], to=b.I64),
        is_short=b.op("And", [b.op("Greater", [q_len, b.zero]), b.op("LessOrEqual", [q_len, short_max])]),
        is_long=b.op("Greater", [q_len, short_max]))


def group_index(b: Nodes, s: StepIndex, flag: str, seq: str, q0: str, R: str, Qn: str) -> GroupIndex:
    """seq [N]: each block's sequence; q0 [N]: its first new-token offset in that sequence."""
    s_start, s_len, s_ctx = (b.op("Gather", [x, seq], axis=0) for x in (s.q_start, s.q_len, s.ctx))
    jq = b.op("Add", [b.col(q0), b.row(b.arange(R))])                          # [N, R] offsets in seq
    q_idx = b.op("Min", [b.op("Add", [b.col(s_start), jq]), s.t_last])
    jk = b.arange(Qn)
    k_idx = b.op("Min", [b.op("Add", [b.col(s_start), b.row(jk)]), s.t_last])
    k_ok = b.op("Less", [b.row(jk), b.col(s_len)])                              # [N, Qn]
    nblk = b.ceil_div(b.group_max(flag, s.ctx), b.BS)
    L = b.op("Mul", [nblk, b.BS])
    tables = b.op("Gather", [b.op("Slice", [b.inp("block_tables"), b.i0, nblk, b.i1]), seq], axis=0)
    N = b.dim(seq, 0)
    ctx_vis = b.op("Less", [b.row(b.arange(L)), b.col(s_ctx)])                 # [N, L]
    ctx_vis = b.op("Expand", [b.op("Unsqueeze", [ctx_vis, b.i1]), b.op("Concat", [N, R, L], axis=0)])
    new_vis = b.op("Slice", [b.op("Gather", [b.inp("mask"), q_idx], axis=0), b.i0, Qn, b.i2])   # [N, R, Qn]
    new_vis = b.op("And", [new_vis, b.op("Unsqueeze", [k_ok, b.i1])])
    vis = b.op("Unsqueeze", [b.op("Concat", [ctx_vis, new_vis], axis=2),
                             b.op("Concat", [b.i1, b.i3], axis=0)])
    return GroupIndex(N=N, R=R, Qn=Qn, L=L, K=b.op("Add", [L, Qn]), q_idx=q_idx, k_idx=k_idx, tables=tables,
                      vis=vis)


@dataclass
class ShortGroup:
    index: GroupIndex
    short_n: str      # [B] 1 where the sequence is short
    short_end: str    # [B] inclusive cumulative count of short sequences
    n_short: str      # [1]


def short_group(b: Nodes, s: StepIndex) -> ShortGroup:
    """One row-block per short sequence, rows = the group's longest query."""
    short_n = b.op("Cast", [s.is_short], to=b.I64)
    short_end = b.op("CumSum", [short_n, b.zero])
    n_short = b.op("ReduceSum", [short_n], keepdims=1)
    R = b.op("Max", [b.group_max(s.is_short, s.q_len), b.i1])
    seq = b.rank_of(short_end, b.arange(n_short))
    gi = group_index(b, s, s.is_short, seq, b.op("Mul", [seq, b.zero]), R, R)
    return ShortGroup(gi, short_n, short_end, n_short)


@dataclass
class LongGroup:
    index: GroupIndex
    tile_begin: str   # [B] first tile of each sequence
    tile: str         # [1] rows per tile


def long_group(b: Nodes, s: StepIndex) -> LongGroup:
    """Tiles of the long sequences: one per sequence, of the longest one's rows, when that pads
    the group's rows at most 2x (a lone prefill chunk, chunks of similar lengths: each sequence's
    keys are gathered once, not once per tile); else TILE rows each (draft trees beside a chunk)."""
    longest = b.group_max(s.is_long, s.q_len)
    n_long = b.op("ReduceSum", [b.op("Cast", [s.is_long], to=b.I64)], keepdims=1)
    long_rows = b.op("ReduceSum", [b.op("Where", [s.is_long, s.q_len, b.zero])], keepdims=1)
    even = b.op("LessOrEqual", [b.op("Mul", [n_long, longest]), b.op("Mul", [long_rows, b.i2])])
    tile = b.op("Where", [even, b.op("Max", [longest, b.const([TILE])]), b.const([TILE])])
    tiles = b.op("Where", [s.is_long, b.ceil_div(s.q_len, tile), b.zero])     # [B] tiles per sequence
    tile_end = b.op("CumSum", [tiles, b.zero])
    tile_begin = b.op("Sub", [tile_end, tiles])
    tile_ids = b.arange(b.op("ReduceSum", [tiles], keepdims=1))
    tile_seq = b.rank_of(tile_end, tile_ids)
    tile_q0 = b.op("Mul", [b.op("Sub", [tile_ids, b.op("Gather", [tile_begin, tile_seq], axis=0)]), tile])
    gi = group_index(b, s, s.is_long, tile_seq, tile_q0, tile, longest)
    return LongGroup(gi, tile_begin, tile)


def packed_rows(b: Nodes, s: StepIndex, sg: ShortGroup, lg: LongGroup | None) -> str:
    """[T]: the row of each packed token in Concat(short output, long output). Token t of
    sequence b at offset j is row rank*Rs + j (short) or Ns*Rs + tile_begin*tile + j (long).
    lg None: the step has no long sequence."""
    t = b.arange(s.T)
    seq = b.rank_of(s.q_end, t)
    j = b.op("Sub", [t, b.op("Gather", [s.q_start, seq], axis=0)])
    rank = b.op("Gather", [b.op("Sub", [sg.short_end, sg.short_n]), seq], axis=0)
    short_row = b.op("Add", [b.op("Mul", [rank, sg.index.R]), j])
    if lg is None:
        return short_row
    long_row = b.op("Add", [b.op("Mul", [sg.n_short, sg.index.R]),
                            b.op("Add", [b.op("Mul", [b.op("Gather", [lg.tile_begin, seq], axis=0),
                                                      lg.tile]), j])])
    return b.op("Where", [b.op("Gather", [s.is_short, seq], axis=0), short_row, long_row])


def attend_standard(b: Nodes, g: GroupIndex, q: str, k: str, v: str, k_cache: str, v_cache: str) -> str:
    """Layer math in default-domain ops: [N * R, Hq, D] float32."""
    F32, N, R, L, K = b.F32, g.N, g.R, g.L, g.K
    kv = []
    for cache, new in ((k_cache, k), (v_cache, v)):
        cached = b.reshape(b.op("Gather", [cache, g.tables], axis=0), [N, L, b.Hkv, b.D])
        both = b.op("Concat", [cached, b.op("Gather", [new, g.k_idx], axis=0)], axis=1)   # [N, K, Hkv, D]
        kv.append(b.op("Cast", [b.op("Transpose", [both], perm=[0, 2, 1, 3])], to=F32))  # [N, Hkv, K, D]
    keys, vals = kv
    # queries [N, Hkv, R*G, D], query head h = kv * G + g
    qp = b.op("Cast", [b.op("Gather", [q, g.q_idx], axis=0)], to=F32)          # [N, R, Hq, D]
    qp = b.op("Transpose", [b.reshape(qp, [N, R, b.Hkv, b.group, b.D])], perm=[0, 2, 1, 3, 4])
    RG = b.op("Mul", [R, b.group])
    qp = b.reshape(b.op("Mul", [qp, b.scale()]), [N, b.Hkv, RG, b.D])
    scores = b.op("MatMul", [qp, b.op("Transpose", [keys], perm=[0, 1, 3, 2])])       # [N, Hkv, R*G, K]
    scores = b.op("Where", [g.vis, b.reshape(scores, [N, b.Hkv, R, b.group, K]), b.fmin])
    probs = b.reshape(b.op("Softmax", [scores], axis=-1), [N, b.Hkv, RG, K])
    out = b.reshape(b.op("MatMul", [probs, vals]), [N, b.Hkv, R, b.group, b.D])
    out = b.op("Transpose", [out], perm=[0, 2, 1, 3, 4])                        # [N, R, Hkv, G, D]
    return b.reshape(out, [b.op("Mul", [N, R]), b.Hq, b.D])


def score_bias(b: Nodes, g: GroupIndex, G: int) -> str:
    """[N, R*G, K] float32 additive bias of `g.vis` for `attend_head_major` (index math)."""
    bias = b.op("Where", [g.vis, b.fzero, b.fmin])                             # [N, 1, R, 1, K]
    if G == 1:
        return b.op("Squeeze", [bias, b.const([1, 3])])
    full = b.op("Expand", [bias, b.op("Concat", [g.N, b.i1, g.R, b.group, g.K], axis=0)])
    return b.reshape(full, [g.N, b.op("Mul", [g.R, b.group]), g.K])


def pool_slots(b: Nodes, g: GroupIndex) -> str:
    """[N, L] int64 (index math): the pool slot of each cached key position of each row-block,
    block_tables[n, j // BS] * BS + j % BS, for pools laid out as [Hkv, slots, D]."""
    tables = b.op("Cast", [g.tables], to=b.I64)                                   # [N, nblk]
    slots = b.op("Add", [b.op("Mul", [b.op("Unsqueeze", [tables, b.i2]), b.BS]), b.arange(b.BS)])
    return b.reshape(slots, [g.N, g.L])                                          # [N, nblk, BS] -> [N, L]


def attend_head_major(b: Nodes, g: GroupIndex, slots: str, bias: str, q2: str, k3: str, v3: str,
                      k_pool: str, v_pool: str, few_queries: bool = False) -> str:
    """Layer math over head-major pools [Hkv, slots, D] (the CPU rewrite; `b.attrs` known).

    The context's keys and values are read with one Gather each, straight into the
    [Hkv, N, L, D] layout the matmuls take: no transpose and no concatenation of the context.
    The step's new keys ([N, Qn] rows of k3 [T, Hkv, D]) are scored apart, their scores joined
    to the context's before the softmax, and their values added after it. q2 is [T, Hq*D];
    `bias` is `score_bias` ([N, R*G, L+Qn]), `slots` is `pool_slots`. Query row r*G + g of
    block n is query head kv*G + g of its r-th token. Returns [N * R, Hq, D] float32.

    few_queries (without GQA only; a handful of query rows per block): scores are computed as
    keys @ q^T, a matrix-vector product over the gathered keys as they lie when R = 1 (2-3x
    faster in onnxruntime than q @ keys^T, which repacks the keys), and only the small score
    matrix is transposed. With GQA (two rows or more on every step) it is faster or slower
    depending on the heads, so the rewrite uses it only without (R = 1 for the decodes of a step
    with a prefill chunk, 2 beside a two-token sequence)."""
    F32, N, R, L, Qn = b.F32, g.N, g.R, g.L, g.Qn
    ctx_k, ctx_v = (b.op("Cast", [b.op("Gather", [pool, slots], axis=1)], to=F32) for pool in (k_pool, v_pool))
    new_k, new_v = (b.op("Transpose", [b.op("Cast", [b.op("Gather", [x, g.k_idx], axis=0)], to=F32)],
                         perm=[2, 0, 1, 3]) for x in (k3, v3))                  # [Hkv, N, Qn, D]
    q = b.op("Cast", [b.op("Gather", [q2, g.q_idx], axis=0)], to=F32)          # [N, R, Hq*D]
    scale = float(b.attrs.scale)
    if few_queries:
        if b.attrs.num_heads != b.attrs.num_kv_heads:
            raise ValueError("few_queries is for attention without GQA")
        q = b.op("Mul", [q, b.scalar(scale, F32)])                              # scaled while 3-D: cheap
        qt = b.op("Transpose", [b.reshape(q, [N, R, b.Hkv, b.D])], perm=[2, 0, 3, 1])   # [Hkv, N, D, R]
        # plain MatMul: onnxruntime runs it as a matrix-vector product (FusedMatMul does not)
        scores_t = b.op("Concat", [b.op("MatMul", [ctx_k, qt]), b.op("MatMul", [new_k, qt])], axis=2)
        scores = b.op("Transpose", [scores_t], perm=[0, 1, 3, 2])                # [Hkv, N, R, L+Qn]
    else:
        q = b.op("Transpose", [b.reshape(q, [N, R, b.Hkv, b.group, b.D])], perm=[2, 0, 1, 3, 4])
        q = b.reshape(q, [b.Hkv, N, b.op("Mul", [R, b.group]), b.D])          # [Hkv, N, R*G, D]
        scores = b.op("Concat", [b.fused_matmul_t(q, ctx_k, scale), b.fused_matmul_t(q, new_k, scale)], axis=3)
    probs = b.op("Softmax", [b.op("Add", [scores, bias])], axis=-1)
    p_ctx, p_new = (b.op("Slice", [probs, lo, hi, b.i3]) for lo, hi in ((b.i0, L), (L, b.op("Add", [L, Qn]))))
    out = b.op("Add", [b.op("MatMul", [p_ctx, ctx_v]), b.op("MatMul", [p_new, new_v])])   # [Hkv, N, R*G, D]
    out = b.op("Transpose", [b.reshape(out, [b.Hkv, N, R, b.group, b.D])], perm=[1, 2, 0, 3, 4])
    return b.reshape(out, [b.op("Mul", [N, R]), b.Hq, b.D])


def attend_decode(b: Nodes, slots: str, bias: str, split: str, q: str, k: str, v: str,
                  k_pool: str, v_pool: str) -> str:
    """Layer math of a decode step over head-major pools [Hkv, slots, D] (the CPU rewrite;
    `b.attrs` known): every sequence that has a new token has exactly one, so token t is the
    only query row of row-block t, its only new key is its own, and the output rows are already
    in packed order. The same math as `attend_head_major` on `short_group`'s index of such a
    step, in about half its nodes: no row gathers and no dynamic shapes.

    q [T, Hq, D], k and v [T, Hkv, D]; `slots` [T, L], `bias` [T, 1, L+1] and `split` [2] = (L, 1)
    are the step's decode index (`ort_attention.decode_feeds`). Returns [T, Hq, D] float32."""
    from onnx import helper

    a, F32 = b.attrs, b.F32
    Hkv, G, D = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_size
    ctx_k, ctx_v = (b.op("Cast", [b.op("Gather", [pool, slots], axis=1)], to=F32) for pool in (k_pool, v_pool))
    new_k, new_v = (b.op("Reshape", [b.op("Transpose", [b.op("Cast", [x], to=F32)], perm=[1, 0, 2]),
                                     b.const([Hkv, -1, 1, D])]) for x in (k, v))      # [Hkv, T, 1, D]
    q = b.op("Cast", [q], to=F32)
    if G == 1:
        # keys @ q^T: a matrix-vector product over the gathered keys as they lie (see
        # attend_head_major's few_queries); [Hkv, T, K, 1] and [Hkv, T, 1, K] share their memory
        q = b.op("Mul", [q, b.scalar(float(a.scale), F32)])
        qt = b.op("Transpose", [b.op("Reshape", [q, b.const([-1, Hkv, D, 1])])], perm=[1, 0, 2, 3])
        scores = b.op("Concat", [b.op("MatMul", [ctx_k, qt]), b.op("MatMul", [new_k, qt])], axis=2)
        scores = b.op("Reshape", [scores, b.const([0, 0, 1, -1])])                # [Hkv, T, 1, K]
    else:
        qh = b.op("Transpose", [b.op("Reshape", [q, b.const([-1, Hkv, G, D])])], perm=[1, 0, 2, 3])
        scores = b.op("Concat", [b.fused_matmul_t(qh, ctx_k, a.scale), b.fused_matmul_t(qh, new_k, a.scale)],
                      axis=3)                                                      # [Hkv, T, G, K]
    probs = b.op("Softmax", [b.op("Add", [scores, bias])], axis=-1)
    p_ctx, p_new = b.name("p_ctx"), b.name("p_new")
    b.nodes.append(helper.make_node("Split", [probs, split], [p_ctx, p_new], axis=3))
    out = b.op("Add", [b.op("MatMul", [p_ctx, ctx_v]), b.op("Mul", [p_new, new_v])])   # [Hkv, T, G, D]
    return b.op("Reshape", [b.op("Transpose", [out], perm=[1, 0, 2, 3]), b.const([-1, a.num_heads, D])])


@dataclass(frozen=True)
class SmallIndex:
    """A small step's index (`ort_attention.decode_feeds`) and the shapes its layers share,
    computed once per step by `small_index`."""

    rows: str        # [B*Q]: the packed row of each (sequence, new token j), padding repeats a row of its own
    out_rows: str    # [T]: each packed token's place in the [B*Q] layout
    slots: str       # [B, L]: each sequence's context slots
    bias: str        # [B, Q*G, L+Q]: 0 where the row sees the key, float32's lowest elsewhere
    split: str       # [2]: (L, Q)
    q_shape: str     # [Hkv, B*Q, G, D] -> [Hkv, B, Q*G, D]
    kv_shape: str    # [B*Q, Hkv, D] -> [B, Q, Hkv, D]


def small_index(b: Nodes, rows: str, out_rows: str, slots: str, bias: str, split: str) -> SmallIndex:
    """The shapes a small step's layers share, from the host's index (`b.attrs` known); the
    bias [B, Q, L+Q] is repeated over each query's G heads, once per step."""
    a = b.attrs
    G = a.num_heads // a.num_kv_heads
    Q = b.op("Slice", [split, b.i1, b.i2])
    q_shape = b.op("Concat", [b.const([0, -1]), b.op("Mul", [Q, b.const([G])]), b.const([0])], axis=0)
    kv_shape = b.op("Concat", [b.const([-1]), Q, b.const([a.num_kv_heads, a.head_size])], axis=0)
    if G > 1:
        bias_shape = b.op("Shape", [bias])
        expanded = b.op("Expand", [b.op("Unsqueeze", [bias, b.const([2])]),
                                   b.op("Concat", [b.op("Slice", [bias_shape, b.i0, b.i2]), b.const([G]),
                                                   b.op("Slice", [bias_shape, b.i2, b.i3])], axis=0)])
        bias = b.op("Reshape", [expanded, b.op("Concat", [b.const([0, -1]), b.op("Slice", [bias_shape, b.i2, b.i3])],
                                                        axis=0)])
    return SmallIndex(rows, out_rows, slots, bias, split, q_shape, kv_shape)


def attend_small(b: Nodes, ix: SmallIndex, q: str, k: str, v: str, k_pool: str, v_pool: str) -> str:
    """Layer math of a small step over head-major pools [Hkv, slots, D] (the CPU rewrite;
    `b.attrs` known): every sequence has at most Q new tokens (a Medusa draft tree, a fork's
    first two tokens, a short chunk), and its Q (padded) query rows read its context, gathered
    once, as one matrix: row (j, g) of sequence i is its j-th token's g-th query head of the
    group. The new keys are the sequence's own Q tokens, seen as the step's mask says. The same
    math as `attend_head_major` on `short_group`'s index of such a step, with the index from the
    host (`ort_attention.decode_feeds`).

    q [T, Hq, D], k and v [T, Hkv, D]. Returns [T, Hq, D] float32."""
    from onnx import helper

    a, F32 = b.attrs, b.F32
    Hkv, G, D = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_size
    ctx_k, ctx_v = (b.op("Cast", [b.op("Gather", [pool, ix.slots], axis=1)], to=F32) for pool in (k_pool, v_pool))
    new_k, new_v = (b.op("Transpose", [b.op("Reshape", [b.op("Gather", [b.op("Cast", [x], to=F32), ix.rows], axis=0),
                                                    ix.kv_shape])], perm=[2, 0, 1, 3])
                    for x in (k, v))                                             # [Hkv, B, Q, D]
    qg = b.op("Gather", [b.op("Reshape", [b.op("Cast", [q], to=F32), b.const([-1, Hkv, G, D])]), ix.rows], axis=0)
    qg = b.op("Reshape", [b.op("Transpose", [qg], perm=[1, 0, 2, 3]), ix.q_shape])         # [Hkv, B, Q*G, D]
    scores = b.op("Concat", [b.fused_matmul_t(qg, ctx_k, a.scale), b.fused_matmul_t(qg, new_k, a.scale)], axis=3)
    probs = b.op("Softmax", [b.op("Add", [scores, ix.bias])], axis=-1)            # [Hkv, B, Q*G, L+Q]
    p_ctx, p_new = b.name("p_ctx"), b.name("p_new")
    b.nodes.append(helper.make_node("Split", [probs, ix.split], [p_ctx, p_new], axis=3))
    out = b.op("Add", [b.op("MatMul", [p_ctx, ctx_v]), b.op("MatMul", [p_new, new_v])])   # [Hkv, B, Q*G, D]
    out = b.op("Transpose", [b.op("Reshape", [out, b.const([Hkv, -1, G, D])])], perm=[1, 0, 2, 3])  # [B*Q, Hkv, G, D]
    return b.op("Gather", [b.op("Reshape", [out, b.const([-1, a.num_heads, D])]), ix.out_rows], axis=0)
