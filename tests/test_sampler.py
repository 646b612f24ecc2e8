"""The batched sampler against per-row sampling and a plain reference, and typical acceptance
against the request's top-k / top-p."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apar_rt.core import SamplingParams
from apar_rt.medusa.tree import MedusaTree
from apar_rt.medusa.verifier import Acceptance, MedusaVerifier
from apar_rt.sampler import SamplingBatch, kept_probs, make_generator, process, sample

V = 300


def mixed_params(n, rng):
    out = []
    for i in range(n):
        kind = i % 6
        out.append(SamplingParams(
            temperature=0.0 if kind == 0 else float(rng.choice([0.3, 0.7, 1.0, 1.8])),
            top_k=int(rng.choice([0, 1, 5, 40, 299, 1000])) if kind in (2, 4) else 0,
            top_p=float(rng.choice([0.05, 0.5, 0.9, 0.999])) if kind in (3, 4) else 1.0,
            seed=int(rng.integers(0, 2**31)),
            logit_bias={int(rng.integers(0, V)): 5.0} if kind == 5 else {}))
    return out


def test_batched_sampling_equals_per_row_sampling():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((48, V)) * 3).astype(np.float32)
    logits[::7] = np.round(logits[::7])                   # ties
    params = mixed_params(48, rng)
    bans = [[int(t) for t in rng.integers(0, V, 3)] for _ in params]
    batch = SamplingBatch()
    for p, b in zip(params, bans):
        batch.add(p, b, make_generator(p.seed))
    tokens, ok, _, _ = sample(logits, batch)
    assert ok.all()
    for i, (p, b) in enumerate(zip(params, bans)):
        one = SamplingBatch()
        one.add(p, b, make_generator(p.seed))
        t1, ok1, _, _ = sample(logits[i:i + 1], one)
        assert ok1[0] and t1[0] == tokens[i], i
        assert tokens[i] not in b


def reference_kept(x, p: SamplingParams):
    """Plain per-row definition: rank by probability (ties: lower id), top-k, then top-p over the
    top-k set's renormalised mass."""
    z = (x - x.max()) / p.temperature
    e = [math.exp(v) if v != -math.inf else 0.0 for v in z.tolist()]
    ranked = sorted(range(len(e)), key=lambda t: (-z[t], t))
    if p.top_k:
        ranked = ranked[:p.top_k]
    if p.top_p >= 1.0:
        return set(ranked)
    mass = sum(e[t] for t in ranked)
    kept, acc = [], 0.0
    for t in ranked:
        if acc / mass >= p.top_p and kept:
            break
        kept.append(t)
        acc += e[t]
    return set(kept)


def test_kept_set_and_draw_match_a_plain_reference():
    rng = np.random.default_rng(1)
    for trial in range(40):
        p = SamplingParams(temperature=float(rng.choice([0.5, 1.0, 2.0])), top_k=int(rng.choice([0, 1, 3, 50, 200])),
                           top_p=float(rng.choice([0.1, 0.6, 0.95, 1.0])))
        x = (rng.standard_normal(V) * float(rng.choice([0.2, 2.0, 5.0]))).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x * 2) / 2                       # many ties
        q = kept_probs(x[None, :], np.array([p.temperature]), np.array([p.top_k]), np.array([p.top_p]))[0]
        assert set(np.nonzero(q > 0)[0].tolist()) == reference_kept(x.astype(np.float64), p), trial
        assert abs(q.sum() - 1.0) < 1e-5
        u = float(rng.random())
        batch = SamplingBatch()
        batch.temperature, batch.top_k, batch.top_p, batch.uniform = [p.temperature], [p.top_k], [p.top_p], [u]
        tok = int(sample(x[None, :], batch)[0][0])
        acc = 0.0
        for t in range(V):          # the kept token, in id order, where the cumulative mass passes u
            acc += float(q[t])
            if acc > u * float(q.sum()):
                break
        assert tok == t


def test_sampled_frequencies_follow_the_softmax():
    x = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))
    p = SamplingParams(temperature=1.0, seed=3)
    g = make_generator(3)
    batch = SamplingBatch()
    for _ in range(4000):
        batch.add(p, (), g)
    tokens, ok, _, _ = sample(np.tile(x, (4000, 1)), batch)
    freq = np.bincount(tokens, minlength=4) / 4000
    assert np.abs(freq - [0.5, 0.25, 0.15, 0.1]).max() < 0.03


def test_a_bad_row_fails_alone():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, V)).astype(np.float32)
    logits[1, 7] = np.nan
    logits[3, 9] = np.inf
    batch = SamplingBatch()
    ps = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.8, seed=2), SamplingParams(),
          SamplingParams(temperature=0.5, seed=4), SamplingParams(temperature=1e38, seed=5)]
    for i, p in enumerate(ps):
        batch.add(p, list(range(V)) if i == 2 else (), make_generator(p.seed))
    tokens, ok, _, _ = sample(logits, batch)
    assert ok.tolist() == [True, False, False, False, True]
    assert tokens[1] == tokens[2] == tokens[3] == -1 and 0 <= tokens[4] < V


@pytest.mark.parametrize("copies", [1, 12])
def test_greedy_batches_skip_the_copy_but_not_the_bans(copies):
    """An all-greedy batch without bias takes the no-copy argmax; it must give what the steps
    define: first argmax after bans, invalid rows (NaN, +inf, all banned) failing alone, a
    banned NaN or +inf ignored. Twelve copies of the rows put more rows with bans in the batch
    than greedy scans in Python (it then finds banned argmaxes in the batch's ban arrays)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 12)).astype(np.float32)
    x[1, 4] = 9.0                      # the max, banned: the next best wins
    x[2, 3] = np.nan                   # a NaN the row may not use: invalid
    x[3, 5] = np.nan                   # a banned NaN: ignored
    x[4, 6] = np.inf                   # +inf, banned: ignored
    x[5, 7] = np.inf                   # +inf not banned: invalid
    x[6, :] = 2.0                      # ties: the lowest id, after the banned 0
    bans = {1: [4], 3: [5], 4: [6], 6: [0], 7: list(range(12)), 8: [2]}
    x = np.tile(x, (copies, 1))
    batch = SamplingBatch()
    for r in range(9 * copies):
        batch.add(SamplingParams(), bans.get(r % 9, []))
    tokens, ok, _, _ = sample(x, batch)
    ref = process(x, batch)           # step 1, then the first argmax of each valid row
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(ref.max(axis=1))
    assert ok.tolist() == valid.tolist() == [True, True, False, True, True, False, True, False, True] * copies
    assert tokens[valid].tolist() == np.argmax(ref[valid], axis=1).tolist()
    assert (tokens[~valid] == -1).all() and tokens[1::9].tolist() != [4] * copies and tokens[6::9].tolist() == [1] * copies


@pytest.mark.parametrize("rows", [1, 3, 300])
def test_greedy_without_bans_fails_only_rows_whose_max_is_not_finite(rows):
    """Without bans no argmax is ranked again, so greedy decides from the rows' maxima alone which
    rows are valid: one whose max is +inf or NaN fails alone, and maxima near float32's largest
    value (whose float32 sum would overflow) are valid."""
    rng = np.random.default_rng(5)
    for bad in (None, np.inf, np.nan):
        x = rng.standard_normal((rows, 12)).astype(np.float32)
        x[:, 3] = np.float32(3e38)
        if bad is not None:
            x[rows // 2, 7] = bad
        batch = SamplingBatch()
        for _ in range(rows):
            batch.add(SamplingParams(), [])
        tokens, ok, _, _ = sample(x, batch)
        want = np.ones(rows, bool)
        if bad is not None:
            want[rows // 2] = False
        assert ok.tolist() == want.tolist()
        assert (tokens[want] == 3).all() and (tokens[~want] == -1).all()


def test_a_batch_sampled_again_after_more_rows_uses_their_bans_too():
    """A batch keeps its ban arrays for a second pass (a replayed step's); rows added after the
    first pass bring their bans into the second."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((80, 16)).astype(np.float32)
    x[:, 5] = 9.0                      # every row's max is token 5
    batch = SamplingBatch()
    for _ in range(70):
        batch.add(SamplingParams(), [5])
    first = sample(x[:70], batch).tokens
    for _ in range(10):
        batch.add(SamplingParams(), [5, 6])
    again = sample(x, batch).tokens
    assert 5 not in first.tolist() and 5 not in again.tolist()
    assert again.tolist() == np.argmax(process(x, batch), axis=1).tolist()


def test_process_adds_bias_and_bans():
    x = np.zeros((2, 6), np.float32)
    batch = SamplingBatch()
    batch.add(SamplingParams(logit_bias={2: 3.0, 5: -1.0}), [0])
    batch.add(SamplingParams(), [1, 2])
    y = process(x, batch)
    assert y[0].tolist() == [-np.inf, 0, 3, 0, 0, -1] and y[1].tolist() == [0, -np.inf, -np.inf, 0, 0, 0]
    assert x.sum() == 0


def test_rows_added_together_equal_rows_added_one_by_one():
    """`add_rows` (a draft tree's nodes) builds the batch `add` builds row by row: the same
    parameters, uniforms, bias entries and bans, numbered after the rows already there."""
    rng = np.random.default_rng(3)
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1),
                   SamplingParams(temperature=1.0, logit_bias={3: 1.5, 7: -2.0})):
        bans = [tuple(int(t) for t in rng.choice(20, int(rng.integers(0, 3)), replace=False)) for _ in range(5)]
        u = 0.0 if params.greedy else float(rng.random())
        together, one_by_one = SamplingBatch(), SamplingBatch()
        for b in (together, one_by_one):
            b.add(SamplingParams(temperature=0.5, logit_bias={1: 1.0}), (2,), uniform=0.25)
        assert together.add_rows(params, bans, u) == 1
        for ban in bans:
            one_by_one.add(params, ban, uniform=u)
        assert together == one_by_one


@pytest.mark.parametrize("restrict", [dict(top_k=1), dict(top_p=0.3)])
def test_typical_acceptance_never_accepts_outside_top_k_top_p(restrict):
    """A draft token with probability well above the typical threshold but outside the
    request's top-k / top-p set is rejected; without the restriction it is accepted."""
    tree = MedusaTree.from_choices([[0]], name="one")
    ver = MedusaVerifier(tree, Acceptance("typical", epsilon=0.09, alpha=0.3))
    probs = np.full(V, 1e-6)
    probs[10], probs[11] = 0.55, 0.44            # token 11: p = 0.44, far above the threshold
    logits = np.tile(np.log(probs / probs.sum()).astype(np.float32), (2, 1))
    for seed in range(20):
        free = SamplingParams(temperature=1.0, seed=seed)
        tokens, nodes = ver.verify(logits, 5, [11], free, lambda t: [], make_generator(seed))
        assert nodes == [0, 1] and tokens[0] == 11
        tight = SamplingParams(temperature=1.0, seed=seed, **restrict)
        tokens, nodes = ver.verify(logits, 5, [11], tight, lambda t: [], make_generator(seed))
        assert nodes == [0] and tokens == [10]   # rejected; the bonus comes from the kept set {10}


def test_nuclei_past_the_candidates_match_the_plain_reference():
    """Flat rows whose top-p nucleus holds hundreds of tokens (the second, histogram-sized pass,
    and the whole-row path when that is not enough or a tie splits its edge)."""
    rng = np.random.default_rng(4)
    V = 3000
    for trial in range(12):
        p = SamplingParams(temperature=1.0, top_k=int(rng.choice([0, 0, 2000])),
                           top_p=float(rng.choice([0.3, 0.7, 0.95])))
        x = (rng.standard_normal(V) * float(rng.choice([0.3, 1.0]))).astype(np.float32)
        if trial % 4 == 0:
            x = np.round(x * 4) / 4                        # ties everywhere, also at the edges
        q = kept_probs(x[None, :], np.array([p.temperature]), np.array([p.top_k]), np.array([p.top_p]))[0]
        want = reference_kept(x.astype(np.float64), p)
        assert len(want) > 64 and set(np.nonzero(q > 0)[0].tolist()) == want, trial


def test_kept_rows_drawn_at_their_ids_equal_their_dense_rows():
    """Top-k and top-p rows leave the pass as the values at their candidate ids; drawn over those
    ids in increasing order they must give the token `draw` gives on the dense rows, for any u
    (u near 1 included), with many ties and nuclei past the candidates."""
    from apar_rt.sampler import _draw_kept, _kept, draw

    rng = np.random.default_rng(7)
    held_at_ids = 0
    for trial in range(20):
        R, V = 12, int(rng.choice([90, 700]))
        x = (rng.standard_normal((R, V)) * float(rng.choice([0.5, 3.0]))).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x)                                # ties, also at the candidates' edge
        t = rng.choice([0.5, 1.0, 1.7], R)
        k = rng.choice([0, 1, 5, 64, 80, V], R)
        p = rng.choice([0.2, 0.9, 0.999, 1.0], R)
        u = rng.random(R)
        u[:3] = [0.0, np.nextafter(1.0, 0.0), 1.0 - 1e-12]
        groups = _kept(x, t, k, p)
        held_at_ids += sum(len(rows) for rows, ids, _ in groups if ids is not None)
        dense = kept_probs(x, t, k, p)
        tokens, good = _draw_kept(groups, u, R)
        assert good.all()
        assert tokens.tolist() == draw(dense, u).tolist(), trial
        assert (dense[np.arange(R), tokens] > 0).all()
    assert held_at_ids > 50
