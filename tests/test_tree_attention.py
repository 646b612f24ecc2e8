"""Tests for apar_rt.ops.tree_attention against an independent, loop-by-loop float64 oracle.

The oracle lists, for every token, the (key, value) vectors it may see: its sequence's
cached positions read one by one through the block table, then the sequence's own new
tokens that the mask allows. Everything else in the pool is poisoned, so any read of an
unused slot, a padding entry or the null block shows up as a mismatch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from apar_rt.medusa.tree import ancestor_mask
from apar_rt.testing.native import baseline_library_or_skip, library_or_skip
from apar_rt.ops.tree_attention import tree_paged_attention_reference  # registers torch.ops.apar.*

POISON = 1.0e4  # magnitude of the garbage in unused pool slots


@dataclass
class Seq:
    kind: str          # "prefill", "decode", "tree" or "empty"
    context_len: int   # tokens already cached
    local_mask: list[list[bool]]  # [n, n]: new token i sees new token j of this sequence

    @property
    def n(self) -> int:
        return len(self.local_mask)


def causal(n: int) -> list[list[bool]]:
    return [[j <= i for j in range(n)] for i in range(n)]


def tree_mask(parents: list[int]) -> list[list[bool]]:
    """Ancestor-or-self mask from a parent array (parents[0] == -1 is the root)."""
    return ancestor_mask(parents)


def random_parents(rng: random.Random, n: int) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def make_seq(rng: random.Random, kind: str, context_len: int | None = None) -> Seq:
    ctx = rng.randrange(0, 11) if context_len is None else context_len
    if kind == "prefill":
        return Seq(kind, ctx, causal(rng.randrange(1, 7)))
    if kind == "decode":
        return Seq(kind, ctx, [[True]])
    if kind == "tree":
        return Seq(kind, ctx, tree_mask(random_parents(rng, rng.randrange(2, 8))))
    if kind == "empty":
        return Seq(kind, ctx, [])
    raise ValueError(kind)


@dataclass
class Step:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start: torch.Tensor
    mask: torch.Tensor
    scale: float

    def args(self):
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.block_tables,
                self.context_lens, self.query_start, self.mask, self.scale)


def build_step(
    seed: int,
    seqs: list[Seq],
    *,
    hq: int,
    hkv: int,
    block_size: int,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float32,
    spare_blocks: int = 3,
    extra_table_cols: int = 2,
    extra_mask_cols: int = 2,
    pad_with_live_blocks: bool = False,
    poison: str = "large",
) -> Step:
    """Random inputs for one packed step, with a shuffled block assignment and a poisoned pool.

    Real data lives only in slots (block_tables[b, p // bs], p % bs) for p < context_lens[b];
    every other pool entry, including all of block 0, holds garbage.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B = len(seqs)
    T = sum(s.n for s in seqs)
    D = head_dim
    nblocks_per_seq = [-(-s.context_len // block_size) for s in seqs]
    num_blocks = 1 + sum(nblocks_per_seq) + spare_blocks
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)

    max_blocks = max(nblocks_per_seq + [1]) + extra_table_cols
    tables = []
    it = iter(ids)
    for nb in nblocks_per_seq:
        tables.append([next(it) for _ in range(nb)])
    padded = []
    for row in tables:
        pad = max_blocks - len(row)
        if pad_with_live_blocks:
            # Padding entries past context_len are never read: point them at real blocks.
            padded.append(row + [rng.randrange(num_blocks) for _ in range(pad)])
        else:
            padded.append(row + [0] * pad)

    shape = (num_blocks, block_size, hkv, D)
    if poison == "large":
        k_cache = (torch.rand(shape, generator=gen) * 2 - 1) * POISON + POISON
        v_cache = (torch.rand(shape, generator=gen) * 2 - 1) * POISON - POISON
    elif poison == "nonfinite":
        choices = torch.tensor([math.nan, math.inf, -math.inf, 3.0e38])
        k_cache = choices[torch.randint(0, 4, shape, generator=gen)]
        v_cache = choices[torch.randint(0, 4, shape, generator=gen)]
    else:
        raise ValueError(poison)
    for row, s in zip(tables, seqs):
        for p in range(s.context_len):
            b, off = row[p // block_size], p % block_size
            k_cache[b, off] = torch.randn(hkv, D, generator=gen)
            v_cache[b, off] = torch.randn(hkv, D, generator=gen)

    q = torch.randn(T, hq, D, generator=gen)
    k = torch.randn(T, hkv, D, generator=gen)
    v = torch.randn(T, hkv, D, generator=gen)

    max_q = max([s.n for s in seqs] + [1]) + extra_mask_cols
    # Entries past a sequence's own token count are garbage: the op must ignore them.
    mask = torch.rand(T, max_q, generator=gen) < 0.5
    qs = [0]
    for s in seqs:
        for i in range(s.n):
            for j in range(s.n):
                mask[qs[-1] + i, j] = s.local_mask[i][j]
        qs.append(qs[-1] + s.n)

    return Step(
        q=q.to(dtype), k=k.to(dtype), v=v.to(dtype),
        k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype),
        block_tables=torch.tensor(padded, dtype=torch.int32).reshape(B, max_blocks),
        context_lens=torch.tensor([s.context_len for s in seqs], dtype=torch.int32),
        query_start=torch.tensor(qs, dtype=torch.int32),
        mask=mask,
        scale=D ** -0.5,
    )


def oracle(step: Step) -> torch.Tensor:
    """Naive float64 attention: per token, the explicit list of visible (key, value) vectors."""
    q, k, v = step.q.double(), step.k.double(), step.v.double()
    kc, vc = step.k_cache, step.v_cache
    T, hq, D = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bs = kc.shape[1]
    qs = step.query_start.tolist()
    out = torch.zeros(T, hq, D, dtype=torch.float64)
    for b in range(len(qs) - 1):
        n = qs[b + 1] - qs[b]
        table = step.block_tables[b].tolist()
        ctx = int(step.context_lens[b])
        for i in range(n):
            t = qs[b] + i
            keys, vals = [], []
            for p in range(ctx):
                blk, off = table[p // bs], p % bs
                keys.append(kc[blk, off].double())
                vals.append(vc[blk, off].double())
            for j in range(n):
                if bool(step.mask[t, j]):
                    keys.append(k[qs[b] + j])
                    vals.append(v[qs[b] + j])
            assert keys, "every token sees at least itself"
            for h in range(hq):
                g = h // group
                scores = torch.tensor([step.scale * float(key[g] @ q[t, h]) for key in keys],
                                      dtype=torch.float64)
                w = torch.softmax(scores, dim=0)
                acc = torch.zeros(D, dtype=torch.float64)
                for wi, val in zip(w, vals):
                    acc += wi * val[g]
                out[t, h] = acc
    return out


def run_op(step: Step) -> torch.Tensor:
    return torch.ops.apar.tree_paged_attention(*step.args())


_SESSIONS: dict = {}


def ort_feeds(feeds: dict, block_size: int, small: bool = True, native: bool = False, slots=None) -> dict:
    """The op's feeds as the onnxruntime CPU rewrite takes them: head-major pools, and the decode
    or small-step index the backend computes on the host (`ort_attention.decode_feeds`; without
    `small`, a small step takes the general branch; with `native`, the native op's steps, and the
    slots it writes the new K/V to: `slots`, else none (-1))."""
    from apar_rt.backends.ort_attention import SLOT_INPUT, decode_feeds, to_head_major

    feeds = dict(feeds, k_cache=to_head_major(feeds["k_cache"]), v_cache=to_head_major(feeds["v_cache"]))
    feeds.update(decode_feeds(feeds["block_tables"], feeds["context_lens"], feeds["query_start"], feeds["mask"],
                              block_size, small=small, native=native))
    if native:
        T = feeds["q"].shape[0]
        feeds[SLOT_INPUT] = np.full(T, -1, np.int32) if slots is None else np.asarray(slots, np.int32)
    return feeds


def run_onnx(step: Step, ort_body: bool = False, small: bool = True, native: bool = False,
             library=library_or_skip) -> torch.Tensor:
    """The ONNX local function (apar_rt.export.op), inlined and run by onnxruntime; with
    `ort_body`, the graph the onnxruntime CPU backend runs instead (`ort_attention.rewrite`),
    where `small` lets small steps take their own branch (else the general one) and `native`
    runs decode steps on the native op library (float32) that `library()` gives."""
    ort = pytest.importorskip("onnxruntime")
    from apar_rt.export import op as aop

    (_, hq, d), hkv, bs = step.q.shape, step.k.shape[1], step.k_cache.shape[1]
    dtype = {torch.float32: "float32", torch.float16: "float16"}[step.q.dtype]
    native = native and dtype == "float32"   # the rewrite keeps standard ops for other dtypes
    key = (hq, hkv, d, bs, dtype, step.scale, ort_body, native and library)
    if key not in _SESSIONS:
        model = aop.attention_model(aop.AttentionAttrs(hq, hkv, d, bs, step.scale), dtype)
        so = ort.SessionOptions()
        if ort_body:
            from apar_rt.backends.ort_attention import rewrite

            if native:
                so.register_custom_ops_library(str(library()))
            rewrite(model, native)
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {name: x.numpy() for name, x in zip(aop.OP_INPUTS, step.args()[:9])}
    if ort_body:
        feeds = ort_feeds(feeds, bs, small, native)
    return torch.from_numpy(_SESSIONS[key].run(None, feeds)[0])


IMPLS = {
    "reference": lambda s: tree_paged_attention_reference(*s.args()),
    "op": run_op,
    "onnx": run_onnx,
    "onnx-ort": lambda s: run_onnx(s, ort_body=True),
    "onnx-ort-general": lambda s: run_onnx(s, ort_body=True, small=False),
    "onnx-ort-native": lambda s: run_onnx(s, ort_body=True, native=True),
    # the same kernel built for the x86-64 baseline: four-lane vectors (as on aarch64), not eight
    "onnx-ort-native-4lane": lambda s: run_onnx(s, ort_body=True, native=True, library=baseline_library_or_skip),
}
HEADS = [(4, 4), (4, 2), (4, 1)]
SEEDS = [0, 1, 2]


def check(step: Step, impl, atol: float = 1e-5, rtol: float = 1e-5) -> torch.Tensor:
    k_before, v_before = step.k_cache.clone(), step.v_cache.clone()
    got = impl(step)
    assert got.shape == step.q.shape
    assert got.dtype == step.q.dtype
    torch.testing.assert_close(got.double(), oracle(step), atol=atol, rtol=rtol)
    # The op reads the pool and never writes it (compared bit for bit, so NaN poison counts).
    assert torch.equal(step.k_cache.view(torch.uint8), k_before.view(torch.uint8))
    assert torch.equal(step.v_cache.view(torch.uint8), v_before.view(torch.uint8))
    return got


# --- the oracle itself ---------------------------------------------------------------


def test_oracle_single_token_no_context_returns_its_value():
    step = build_step(0, [Seq("decode", 0, [[True]])], hq=2, hkv=1, block_size=4)
    want = step.v[0].double().repeat_interleave(2, dim=0)
    torch.testing.assert_close(oracle(step), want[None])


def test_tree_mask_from_parents():
    m = tree_mask([-1, 0, 0, 1, 3])
    assert m == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, False, True, False, False],
        [True, True, False, True, False],
        [True, True, False, True, True],
    ]


# --- scenarios -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("seed", SEEDS)
def test_pure_prefill(impl, hq, hkv, block_size, seed):
    rng = random.Random(seed)
    seqs = [Seq("prefill", 0, causal(rng.randrange(1, 9))) for _ in range(rng.randrange(1, 4))]
    check(build_step(seed, seqs, hq=hq, hkv=hkv, block_size=block_size), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("seed", SEEDS)
def test_decode_shuffled_tables_partial_blocks(impl, hq, hkv, block_size, seed):
    rng = random.Random(100 + seed)
    # Context lengths that end mid-block, on a block edge, and at zero.
    ctxs = [rng.randrange(1, 14) for _ in range(3)] + [block_size * 2, 0]
    rng.shuffle(ctxs)
    seqs = [make_seq(rng, "decode", c) for c in ctxs]
    check(build_step(seed, seqs, hq=hq, hkv=hkv, block_size=block_size), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_prefill_decode_tree(impl, hq, hkv, block_size, seed):
    rng = random.Random(200 + seed)
    kinds = ["prefill", "decode", "tree", "decode", "tree", "prefill"]
    rng.shuffle(kinds)
    seqs = [make_seq(rng, kind) for kind in kinds]
    seqs[0].context_len = 0  # one sequence without any cache
    check(build_step(seed, seqs, hq=hq, hkv=hkv, block_size=block_size), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", [(3, 1), (6, 2), (2, 2)])
@pytest.mark.parametrize("head_dim", [10, 12, 40, 64, 72])
def test_head_sizes_and_odd_groups(impl, hq, hkv, head_dim):
    """Head sizes that fill the CPU kernels' register chunks (64), leave a chunk and a vector (40,
    72) or a scalar tail (10 for both vector widths, 12 for eight lanes); query groups of 3 (a
    pair of heads, then one alone); key counts on either side of a multiple of 4 and 8."""
    rng = random.Random(500 + head_dim + hq)
    seqs = [make_seq(rng, "decode", c) for c in (0, 3, 8, 13, 37)] + [make_seq(rng, "tree", 6),
                                                                    make_seq(rng, "prefill", 9)]
    check(build_step(head_dim, seqs, hq=hq, hkv=hkv, block_size=4, head_dim=head_dim), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_scores_hundreds_apart(impl):
    """Queries 40x their usual size: most weights underflow to zero (the CPU kernels' exp returns
    0 below -87) and the softmax is nearly one-hot."""
    rng = random.Random(600)
    seqs = [make_seq(rng, "decode", c) for c in (5, 21)] + [make_seq(rng, "tree", 9)]
    step = build_step(600, seqs, hq=4, hkv=2, block_size=4, head_dim=64)
    step.q.mul_(40.0)
    check(step, IMPLS[impl], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("seed", SEEDS)
def test_draft_trees_of_one_shape(impl, hq, hkv, seed):
    """Medusa's step: every sequence verifies a tree of the same shape (a small step with no
    padding row on the CPU rewrite), at different contexts, one of them empty."""
    rng = random.Random(400 + seed)
    parents = random_parents(rng, rng.randrange(2, 9))
    seqs = [Seq("tree", ctx, tree_mask(parents)) for ctx in (rng.randrange(1, 14), 0, rng.randrange(5, 20))]
    check(build_step(seed, seqs, hq=hq, hkv=hkv, block_size=4), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("seed", SEEDS)
def test_padding_entries_point_at_live_blocks(impl, seed):
    """Table entries past context_len may name any block: they must not be read."""
    rng = random.Random(300 + seed)
    seqs = [make_seq(rng, kind) for kind in ("prefill", "decode", "tree", "decode")]
    step = build_step(seed, seqs, hq=4, hkv=2, block_size=4, pad_with_live_blocks=True,
                      extra_table_cols=4)
    check(step, IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("seed", SEEDS)
def test_empty_sequence_in_batch(impl, seed):
    """A sequence with no new tokens this step (query_start repeats) contributes nothing."""
    rng = random.Random(400 + seed)
    seqs = [make_seq(rng, "empty"), make_seq(rng, "tree"), make_seq(rng, "empty"),
            make_seq(rng, "decode"), make_seq(rng, "empty")]
    check(build_step(seed, seqs, hq=4, hkv=2, block_size=4), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_decode_step_with_no_context_at_all(impl, hq, hkv):
    """Every sequence's first token as a decode step: no context to read (L = 0), each token
    sees only itself."""
    check(build_step(3, [Seq("decode", 0, [[True]]), Seq("empty", 0, []), Seq("decode", 0, [[True]])],
                     hq=hq, hkv=hkv, block_size=4), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("seed", SEEDS)
def test_decode_step_among_padding_sequences(impl, hq, hkv, seed):
    """A pure decode step (one new token or none per sequence: a bucket's padding rows), the
    shape onnxruntime's CPU graph takes its decode path for; one decode at context 0."""
    rng = random.Random(700 + seed)
    seqs = [make_seq(rng, "empty"), make_seq(rng, "decode"), make_seq(rng, "empty"), make_seq(rng, "decode"),
            make_seq(rng, "decode"), make_seq(rng, "empty")]
    seqs[3].context_len = 0
    check(build_step(seed, seqs, hq=hq, hkv=hkv, block_size=4), IMPLS[impl])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kinds", [("prefill", "decode", "tree", "decode"), ("decode", "empty", "decode")],
                         ids=["mixed", "decode"])
def test_float16(impl, hq, hkv, seed, kinds):
    rng = random.Random(500 + seed)
    seqs = [make_seq(rng, kind) for kind in kinds]
    step = build_step(seed, seqs, hq=hq, hkv=hkv, block_size=4, dtype=torch.float16)
    # Poison in float16 stays finite (|x| <= 2e4 < 65504).
    assert torch.isfinite(step.k_cache).all() and torch.isfinite(step.v_cache).all()
    check(step, IMPLS[impl], atol=2e-3, rtol=2e-3)


def native_step_session(seed: int, slots_of=None):
    """Two decodes and a draft tree (hq 4, hkv 2, block size 4) as one step, a session of the
    rewritten graph on the native op, and its feeds (with `slots_of(step)` as the slot mapping)."""
    ort = pytest.importorskip("onnxruntime")
    from apar_rt.backends.ort_attention import rewrite
    from apar_rt.export import op as aop

    rng = random.Random(seed)
    step = build_step(seed, [make_seq(rng, "decode", 9), make_seq(rng, "tree"), make_seq(rng, "decode", 5)],
                      hq=4, hkv=2, block_size=4)
    model = aop.attention_model(aop.AttentionAttrs(4, 2, step.q.shape[2], 4, step.scale))
    rewrite(model, native=True)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library_or_skip()))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = ort_feeds({name: x.numpy() for name, x in zip(aop.OP_INPUTS, step.args()[:9])}, 4, native=True,
                      slots=None if slots_of is None else slots_of(step))
    return step, sess, feeds


def test_native_op_refuses_a_block_outside_the_pool():
    """The native op reads keys through the block tables it is given: a block id outside the pool
    in a visible part of a table fails the run with a message naming it, instead of reading out
    of bounds."""
    step, sess, feeds = native_step_session(7)
    assert bool(feeds["apar_decode"][0]), "decodes and a draft tree: the native op's step"
    torch.testing.assert_close(torch.from_numpy(sess.run(None, feeds)[0]).double(), oracle(step), atol=1e-5, rtol=1e-5)
    tables = feeds["block_tables"].copy()
    tables[2, 1] = 10 ** 6
    with pytest.raises(Exception, match="block 1000000 in the table of sequence 2 is outside the pool's"):
        sess.run(None, dict(feeds, block_tables=tables))


def test_native_op_writes_the_new_keys_and_values_at_their_slots():
    """Given the step's slot_mapping, the native op stores each token's new key and value in the
    pools (head-major: pool[h, slot] = k[t, h]) after attending, and nothing else: a -1 slot (a
    draft tree's node) is not written, the output is the oracle's, and every other pool entry
    keeps its bits. A slot outside the pools fails the run with a message, before anything is stored."""
    from apar_rt.backends.ort_attention import SLOT_INPUT

    def slots_of(step):   # every third token a draft node (-1); the others at slots from the pool's end
        T, S = step.q.shape[0], step.k_cache.shape[0] * step.k_cache.shape[1]
        return np.array([-1 if t % 3 == 1 else S - 1 - 2 * t for t in range(T)], np.int32)

    step, sess, feeds = native_step_session(9, slots_of)
    slots = feeds[SLOT_INPUT]
    T, S = step.q.shape[0], step.k_cache.shape[0] * step.k_cache.shape[1]
    # the pools as the backend binds them: contiguous memory the caller owns, which the op writes
    feeds["k_cache"], feeds["v_cache"] = np.ascontiguousarray(feeds["k_cache"]), np.ascontiguousarray(feeds["v_cache"])
    want_k, want_v = feeds["k_cache"].copy(), feeds["v_cache"].copy()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want_k[:, slot], want_v[:, slot] = feeds["k"][t], feeds["v"][t]
    assert (slots < 0).any() and (want_k != feeds["k_cache"]).any()
    out = sess.run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(out).double(), oracle(step), atol=1e-5, rtol=1e-5)
    assert np.array_equal(feeds["k_cache"].view(np.uint32), want_k.view(np.uint32))
    assert np.array_equal(feeds["v_cache"].view(np.uint32), want_v.view(np.uint32))
    bad = slots.copy()
    bad[-1] = S   # the last token's slot is outside: the run fails before it stores anything
    with pytest.raises(Exception, match=f"slot {S} of token {T - 1} is outside the pools' {S} slots"):
        sess.run(None, dict(feeds, k=feeds["k"] + 1, v=feeds["v"] + 1, **{SLOT_INPUT: bad}))
    assert np.array_equal(feeds["k_cache"].view(np.uint32), want_k.view(np.uint32))
    assert np.array_equal(feeds["v_cache"].view(np.uint32), want_v.view(np.uint32))


@pytest.mark.parametrize("impl", ["onnx-ort-native", "onnx-ort-native-4lane"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
def test_native_rows_do_not_depend_on_where_the_chunk_starts(impl, hq, hkv):
    """With one query head per KV head the native op takes a chunk's tokens two at a time (a
    key read once for both). Each token's row must still be, bit for bit, what it is when the
    chunk starts one token later and the pairs shift: where a request's prefill chunks start
    depends on the other requests of the step, and greedy output must not."""
    ctx, n, bs, D = 5, 9, 4, 16
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(ctx + n, hkv, D, generator=gen), torch.randn(ctx + n, hkv, D, generator=gen)
    queries = torch.randn(n, hq, D, generator=gen)
    num_blocks = 2 + -(-(ctx + n) // bs)
    table = list(range(1, num_blocks))
    random.Random(3).shuffle(table)

    def rows_from(s: int) -> torch.Tensor:
        """The chunk's tokens s.. as one step, with the tokens before them in the pool."""
        k_cache = torch.full((num_blocks, bs, hkv, D), POISON)
        v_cache = torch.full((num_blocks, bs, hkv, D), -POISON)
        for p in range(ctx + s):
            k_cache[table[p // bs], p % bs], v_cache[table[p // bs], p % bs] = keys[p], values[p]
        m = n - s
        mask = torch.zeros(m, n + 2, dtype=torch.bool)
        mask[:, :m] = torch.tensor(causal(m))
        step = Step(q=queries[s:].contiguous(), k=keys[ctx + s:].contiguous(), v=values[ctx + s:].contiguous(),
                    k_cache=k_cache, v_cache=v_cache, block_tables=torch.tensor([table], dtype=torch.int32),
                    context_lens=torch.tensor([ctx + s], dtype=torch.int32),
                    query_start=torch.tensor([0, m], dtype=torch.int32), mask=mask, scale=D ** -0.5)
        return check(step, IMPLS[impl])

    whole = rows_from(0)
    for s in (1, 2, 3):
        assert torch.equal(rows_from(s), whole[s:]), f"the chunk from token {s} changed its rows"

@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("poison", ["large", "nonfinite"])
@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_decode_path_matches_the_oracle(hq, hkv, block_size, poison, seed):
    """`decode_attention`, the CPU op's path for decode steps: shuffled tables, contexts ending
    mid-block, on a block edge and at zero, a sequence without a token (a bucket's padding row),
    and garbage (huge, or NaN/inf) in every slot no token sees, which must not leak. The mask
    has spare columns, as the contract allows. (The registered CPU op, `split_attention`, runs
    every scenario above as impl "op": its decodes through this path, the rest through the
    reference.)"""
    from apar_rt.ops import tree_attention as ta

    rng = random.Random(900 + seed)
    seqs = [make_seq(rng, "decode", c) for c in (rng.randrange(1, 40), 0, block_size * 3, rng.randrange(1, 40))]
    seqs.insert(2, make_seq(rng, "empty"))
    step = build_step(seed, seqs, hq=hq, hkv=hkv, block_size=block_size, poison=poison)
    got = check(step, lambda s: ta.decode_attention(*s.args()))
    assert torch.isfinite(got).all()
    assert step.mask.shape[1] > 1


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("poison", ["large", "nonfinite"])
@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_group_path_matches_the_oracle(hq, hkv, poison, seed):
    """`group_attention`, the CPU op's path for prefill chunks and draft trees, on a whole mixed
    step (it takes any step whose sequences all have tokens): chunks mid-block and at context 0,
    trees, decodes, garbage in unseen slots."""
    from apar_rt.ops.tree_attention import group_attention

    rng = random.Random(1000 + seed)
    seqs = [make_seq(rng, kind) for kind in ("prefill", "tree", "decode", "prefill", "tree")]
    seqs[3].context_len = 0
    step = build_step(seed, seqs, hq=hq, hkv=hkv, block_size=4, poison=poison)
    assert torch.isfinite(check(step, lambda s: group_attention(*s.args()))).all()


# the contract lets the ONNX function rely on finite pool contents: its implementations are not run here
@pytest.mark.parametrize("impl", sorted(i for i in IMPLS if not i.startswith("onnx")))
@pytest.mark.parametrize("seed", SEEDS)
def test_nonfinite_garbage_is_not_read(impl, seed):
    """NaN / inf in unused slots and in the null block must not leak into the output."""
    rng = random.Random(600 + seed)
    seqs = [make_seq(rng, kind) for kind in ("prefill", "decode", "tree", "decode")]
    seqs[1].context_len = 0
    step = build_step(seed, seqs, hq=4, hkv=2, block_size=4, poison="nonfinite")
    got = check(step, IMPLS[impl])
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 1)])
@pytest.mark.parametrize("block_size", [1, 4])
def test_long_chunks_tiled_among_decodes_and_trees(impl, hq, hkv, block_size):
    """Chunks longer than a tile (one starting mid-block, one at context 0), a fork's two tokens,
    a draft tree and decodes in one step: the ONNX function splits them into groups and tiles."""
    from apar_rt.export.attention_body import TILE

    seqs = [Seq("decode", 5, [[True]]), Seq("prefill", 7, causal(TILE * 2 + 3)),
            Seq("tree", 3, tree_mask([-1, 0, 0, 1])), Seq("empty", 2, []), Seq("prefill", 2, causal(2)),
            Seq("prefill", 0, causal(TILE + 1)), Seq("decode", 0, [[True]]), Seq("tree", 9, tree_mask([-1, 0]))]
    check(build_step(9, seqs, hq=hq, hkv=hkv, block_size=block_size), IMPLS[impl], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 1)])
@pytest.mark.parametrize("block_size", [1, 4])
def test_a_chunk_in_tiles_beside_draft_trees(impl, hq, hkv, block_size):
    """A chunk of several TILE-row tiles (starting mid-block) beside draft trees, so short that
    one tile per sequence would pad the group far more than 2x: the chunk is cut into tiles."""
    from apar_rt.export.attention_body import TILE

    seqs = [Seq("tree", 4, tree_mask([-1, 0, 0, 1])), Seq("prefill", 5, causal(TILE * 3 + 5)),
            Seq("tree", 0, tree_mask([-1, 0, 1])), Seq("decode", 3, [[True]]),
            Seq("tree", 7, tree_mask([-1, 0, 0, 2, 2])), Seq("tree", 2, tree_mask([-1, 0, 1, 2]))]
    check(build_step(11, seqs, hq=hq, hkv=hkv, block_size=block_size), IMPLS[impl], atol=2e-5, rtol=2e-5)


def test_poisoned_pool_actually_poisons():
    """Sanity check of the test itself: reading a garbage slot changes the answer."""
    step = build_step(0, [make_seq(random.Random(0), "decode", 3)], hq=2, hkv=1, block_size=4)
    good = oracle(step)
    step.context_lens[0] = 4  # now slot 3 of the first block (garbage) is visible
    assert not torch.allclose(oracle(step), good, atol=1.0)


def test_op_registration_and_fake():
    """The registered op (on the CPU: split_attention) against the oracle, and its schema and fake
    kernel."""
    seqs = [make_seq(random.Random(7), kind) for kind in ("prefill", "tree", "decode")]
    step = build_step(7, seqs, hq=4, hkv=2, block_size=4)
    check(step, run_op)
    torch.library.opcheck(torch.ops.apar.tree_paged_attention.default, step.args(),
                          test_utils=("test_schema", "test_faketensor"))


def _float_intermediates(step: Step) -> int:
    """Elements of every float tensor the inlined ONNX function materialises for `step`.

    Scores, probabilities and gathered keys dominate, so this follows both the function's
    memory and its matmul work, without timing anything.
    """
    import numpy as np
    import onnx.inliner

    ort = pytest.importorskip("onnxruntime")
    from apar_rt.export import op as aop

    (_, hq, d), hkv, bs = step.q.shape, step.k.shape[1], step.k_cache.shape[1]
    model = onnx.inliner.inline_local_functions(aop.attention_model(aop.AttentionAttrs(hq, hkv, d, bs, step.scale)))
    for name in [o for n in model.graph.node for o in n.output if o != "out"]:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {name: x.numpy() for name, x in zip(aop.OP_INPUTS, step.args()[:9])})
    return sum(o.size for o in outs if o.dtype == np.float32)


def _ort_taken(step: Step) -> tuple[list, dict]:
    """The nodes of the graph the onnxruntime CPU backend runs (`ort_attention.rewrite`) that run
    on `step`, each `If` replaced by the branch it takes (at any depth), and every tensor they
    make. The inlined graph must give the rewrite's own result."""
    import numpy as np
    import onnx
    from onnx import helper

    ort = pytest.importorskip("onnxruntime")
    from apar_rt.backends.ort_attention import rewrite
    from apar_rt.export import op as aop

    (_, hq, d), hkv, bs = step.q.shape, step.k.shape[1], step.k_cache.shape[1]
    model = aop.attention_model(aop.AttentionAttrs(hq, hkv, d, bs, step.scale))
    rewrite(model)
    feeds = ort_feeds({name: x.numpy() for name, x in zip(aop.OP_INPUTS, step.args()[:9])}, bs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(m, extra):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in m.graph.output], sess.run(None, feeds)))

    flat = onnx.ModelProto.FromString(model.SerializeToString())
    while ifs := [n for n in flat.graph.node if n.op_type == "If"]:   # nested Ifs: one level per pass
        taken = run(flat, sorted({n.input[0] for n in ifs}))
        nodes = []
        for n in flat.graph.node:
            if n.op_type != "If":
                nodes.append(n)
                continue
            branch = {a.name: a.g for a in n.attribute}["then_branch" if bool(taken[n.input[0]]) else "else_branch"]
            nodes.extend(branch.node)
            nodes.extend(helper.make_node("Identity", [b.name], [o]) for b, o in zip(branch.output, n.output))
        del flat.graph.node[:]
        flat.graph.node.extend(nodes)
    outs = run(flat, [o for n in nodes for o in n.output if o != "out"])
    assert np.array_equal(outs["out"], run(model, [])["out"])
    return nodes, outs


def _ort_float_intermediates(step: Step) -> int:
    """`_float_intermediates` for the graph the onnxruntime CPU backend runs."""
    import numpy as np

    nodes, outs = _ort_taken(step)
    assert not any(n.op_type == "MultiHeadAttention" for n in nodes)   # no op keeps a score matrix inside
    return sum(o.size for o in outs.values() if o.dtype == np.float32)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_cpu_rewrite_runs_each_step_on_its_own_path(hq, hkv):
    """A decode step (at most one new token per sequence) takes `attend_decode` in every layer; a
    small step (a fork whose parent ended before computing [Fork], a draft tree, next to decodes)
    takes `attend_small`; a step with a chunk longer than SMALL_MAX_QUERY, or whose padding to the
    longest query would pass SMALL_MAX_PADDING times its tokens, takes the general path. Each runs
    none of the others' nodes. All give the oracle's result (the tests above); this checks which
    nodes run."""
    from apar_rt.backends.ort_attention import SMALL_MAX_PADDING, SMALL_MAX_QUERY

    rng = random.Random(5)
    decode = [make_seq(rng, "empty"), make_seq(rng, "decode", 9), make_seq(rng, "decode", 0)]
    two = [make_seq(rng, "decode", 9), Seq("tree", 6, tree_mask([-1, 0]))]
    chunk = [make_seq(rng, "decode", 3), Seq("prefill", 5, causal(SMALL_MAX_QUERY + 1))]
    padded = [Seq("decode", 4, [[True]]) for _ in range(2 * SMALL_MAX_PADDING)] + [Seq("prefill", 0, causal(16))]
    paths = ("/decode/", "/small/", "/general/")
    for seqs, runs in ((decode, "/decode/"), (two, "/small/"), (chunk, "/general/"), (padded, "/general/")):
        names = [o for n in _ort_taken(build_step(0, seqs, hq=hq, hkv=hkv, block_size=4))[0] for o in n.output]
        assert any(runs in o for o in names), runs
        assert not any(p in o for o in names for p in paths if p != runs), runs


def test_onnx_mixed_step_costs_its_parts_in_the_cpu_rewrite():
    """The same for the graph onnxruntime runs on the CPU: decodes go to the short group, the chunk
    to the long group's tiles, and neither pads to the other."""
    decodes = [Seq("decode", 60, [[True]]) for _ in range(32)]
    chunk = [Seq("prefill", 0, causal(300))]
    cost = {name: _ort_float_intermediates(build_step(0, seqs, hq=2, hkv=1, block_size=16))
            for name, seqs in (("decodes", decodes), ("chunk", chunk), ("mixed", decodes + chunk))}
    assert cost["mixed"] <= 1.5 * (cost["decodes"] + cost["chunk"]), cost


def test_onnx_mixed_step_costs_its_parts():
    """32 decodes plus a long prefill chunk in one step cost what they cost apart (<= 1.5x).

    Padding every sequence to the longest query made this mixed step about 26x its parts.
    """
    decodes = [Seq("decode", 60, [[True]]) for _ in range(32)]
    chunk = [Seq("prefill", 0, causal(300))]
    cost = {name: _float_intermediates(build_step(0, seqs, hq=2, hkv=1, block_size=16))
            for name, seqs in (("decodes", decodes), ("chunk", chunk), ("mixed", decodes + chunk))}
    assert cost["mixed"] <= 1.5 * (cost["decodes"] + cost["chunk"]), cost
