"""Token selection for a whole step in one vectorised pass: bias, bans, greedy or
temperature / top-k / top-p, with per-request seeds.

The semantics are defined once, here, over numpy (so the ONNX Runtime path needs no torch):

1. x = logits + logit_bias, with banned tokens at -inf. A row with a NaN or +inf, or with every
   token banned, has no valid distribution: that row alone fails (`ok` is False for it).
2. Greedy rows (temperature 0) take the first argmax of x.
3. Other rows take p = softmax((x - max x) / temperature). Tokens are ranked by p, ties by lower
   id; top-k keeps the first k; top-p then keeps the shortest ranked prefix whose mass, over the
   top-k set, reaches top_p. The kept probabilities are renormalised.
4. The row's token is the kept token, in token-id order, where the cumulative kept mass first
   exceeds u, a uniform draw in [0, 1) taken from the request's own RNG (one per sampled row).

Because each row's token depends only on its logits, its parameters and its own u, sampling a
batch gives the same tokens as sampling its rows one at a time. A batch may also ask for
*probes*: the kept probability of a given token in a given row (0 outside the kept set), and
the entropy of the kept distribution of each probed row; Medusa's typical acceptance needs only
these. A greedy row's kept distribution is the point mass at its token.

A backend that keeps logits on a device implements the same steps there
(`apar_rt.backends.torch_sampler`), so only these small arrays cross back; this module is the
reference it is tested against. `ranked_top_k` is the one definition of "the k best tokens"
(largest first, ties to the lower id) that Medusa drafting uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from apar_rt.core import SamplingParams

CANDIDATES = 64    # top-p looks for its nucleus among this many best tokens first (exact fallback)
NUCLEUS_BINS = 256  # value bins of the mass histogram that sizes the candidates of a larger nucleus


class SamplingError(ValueError):
    """A request's logits or sampling parameters give no valid distribution (its message is
    safe to show the client). The engine fails that request alone."""


def make_generator(seed: int | None, path: tuple[int, ...] = ()) -> np.random.Generator:
    """The RNG of a request's branch at `path` in its tree (`Request.tree_path`; () for the root).

    With a `seed`, it is seeded by the seed (a negative one as its 64-bit two's complement, as the
    int64 seeds of OpenAI clients come) and the path alone: the root's is numpy's
    `default_rng(seed)`, and each child's numbers follow from where it lies in the tree, not from
    which branches ran before it. Without, it is seeded from OS entropy."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(np.random.SeedSequence(seed & _SEED_MASK, spawn_key=path))


_SEED_MASK = (1 << 64) - 1


@dataclass(slots=True)
class SamplingBatch:
    """Per-row parameters of one sampling pass (rows are logits rows to sample from)."""

    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    uniform: list[float] = field(default_factory=list)
    bias: list[tuple[int, int, float]] = field(default_factory=list)   # (row, token, value)
    bans: list[tuple[int, Sequence[int]]] = field(default_factory=list)  # (row, the token ids it may not sample)
    probes: list[tuple[int, int]] = field(default_factory=list)        # (row, token): kept probability wanted
    # `_indexed_bans` of the first `_bans_at` bans (a batch only grows: `add`, `add_rows`), kept
    # for a batch sampled again (the engine reuses a replayed step's)
    _bans_at: int = field(default=0, repr=False, compare=False)
    _ban_arrays: tuple | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.temperature)

    def add(self, params: SamplingParams, banned: Sequence[int] = (), generator=None,
            uniform: float | None = None) -> int:
        """Add a row; its uniform is `uniform` when given, else drawn from `generator` when the row
        samples. Returns its index. `params` is already validated (SamplingParams checks its
        fields) and `banned` holds token ids, kept as it is (not copied: it must not change
        afterwards, as the scheduler's memoised tuples do not); what is still converted (the
        uniform, the bias) is converted first, so a bad value raises here and leaves the batch
        unchanged."""
        r = len(self.temperature)
        t = params.temperature
        if uniform is not None:
            u = float(uniform)
        else:
            u = float(generator.random()) if (generator is not None and t != 0.0) else 0.0
        if params.logit_bias:
            self.bias.extend([(r, int(tok), float(v)) for tok, v in params.logit_bias])
        self.temperature.append(t)
        self.top_k.append(params.top_k)
        self.top_p.append(params.top_p)
        self.uniform.append(u)
        if banned:
            self.bans.append((r, banned))   # rows share the scheduler's memoised tuples: nothing copied
        return r

    def add_rows(self, params: SamplingParams, bans: Sequence[Sequence[int]], uniform: float = 0.0) -> int:
        """Add len(bans) rows of the same `params` and `uniform` (a draft tree's nodes), row i
        banning bans[i] (kept as they are, as `add` keeps them); returns the first row's index.
        What is converted is converted first, so a bad value leaves the batch unchanged."""
        r = len(self.temperature)
        n = len(bans)
        u = float(uniform)
        if params.logit_bias:
            pairs = [(int(tok), float(v)) for tok, v in params.logit_bias]
            self.bias.extend([(r + i, tok, v) for i in range(n) for tok, v in pairs])
        self.temperature.extend([params.temperature] * n)
        self.top_k.extend([params.top_k] * n)
        self.top_p.extend([params.top_p] * n)
        self.uniform.extend([u] * n)
        self.bans.extend([(r + i, b) for i, b in enumerate(bans) if b])
        return r

    def ban_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The bans as (rows, tokens) int64 arrays, one entry per (row, banned token); made once
        for the bans the batch has (it only grows), so a batch sampled again reuses them."""
        return self._indexed_bans()[:2]

    def banned_at(self, rows) -> list[tuple[int, Sequence[int]]]:
        """The bans of `rows` (rows that have some, in increasing order), as `bans` holds them."""
        entries = self._indexed_bans()[2]
        return [self.bans[i] for i in np.searchsorted(entries, rows).tolist()]

    def _indexed_bans(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`ban_arrays` and each entry of `bans`'s row (increasing: rows are added in order)."""
        if self._ban_arrays is None or self._bans_at != len(self.bans):
            entries = np.asarray([r for r, _ in self.bans], np.int64)
            rows = np.repeat(entries, [len(t) for _, t in self.bans])
            tokens = np.fromiter((t for _, ts in self.bans for t in ts), np.int64, len(rows))
            self._ban_arrays, self._bans_at = (rows, tokens, entries), len(self.bans)
        return self._ban_arrays

    def select(self, rows: Sequence[int]) -> tuple[SamplingBatch, list[int]]:
        """Rows `rows` alone, renumbered 0.., with their probes; and the indices those probes
        had in this batch."""
        new = {r: i for i, r in enumerate(rows)}
        sub = SamplingBatch([self.temperature[r] for r in rows], [self.top_k[r] for r in rows],
                            [self.top_p[r] for r in rows], [self.uniform[r] for r in rows],
                            [(new[r], t, v) for r, t, v in self.bias if r in new],
                            [(new[r], t) for r, t in self.bans if r in new])
        kept = [j for j, (r, _) in enumerate(self.probes) if r in new]
        sub.probes = [(new[self.probes[j][0]], self.probes[j][1]) for j in kept]
        return sub, kept


class Sampled(NamedTuple):
    """What a sampling pass returns (all on the host, all small)."""

    tokens: np.ndarray    # [R] int64: the sampled (or greedy) token; -1 where not ok
    ok: np.ndarray        # [R] bool: False where the row has no valid distribution
    probes: np.ndarray    # [P] float32: kept probability of each batch.probes (row, token): 0 outside the
                          # kept set or the vocabulary, NaN on a bad row
    entropy: np.ndarray   # [R] float64: entropy (nats) of the kept distribution of probed rows; NaN elsewhere


def process(logits: np.ndarray, batch: SamplingBatch, inplace: bool = False) -> np.ndarray:
    """Step 1: logits [R, V] as float32 with bias added and bans set to -inf (entries naming a
    token outside [0, V) are ignored); a copy, or the array itself when `inplace` (the caller's
    rows are then consumed)."""
    x = np.asarray(logits, dtype=np.float32) if inplace else np.array(logits, dtype=np.float32, copy=True)
    V = x.shape[1]
    if batch.bias:
        b = np.asarray(batch.bias, dtype=np.float64)
        rows, toks = b[:, 0].astype(np.int64), b[:, 1].astype(np.int64)
        keep = (toks >= 0) & (toks < V)
        np.add.at(x, (rows[keep], toks[keep]), b[keep, 2].astype(np.float32))
    if batch.bans:
        rows, toks = batch.ban_arrays()
        keep = (toks >= 0) & (toks < V)
        x[rows[keep], toks[keep]] = -np.inf
    return x


def valid_rows(x: np.ndarray) -> np.ndarray:
    """Rows of processed logits that give a distribution: no NaN, no +inf, not all banned
    (a row's max is NaN if any entry is, +inf if any is, -inf if all are)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(x.max(axis=1))


def kept_probs(x: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Step 3 for valid sampled rows: [R, V] float32, the renormalised kept probabilities (0 elsewhere)."""
    groups = _kept(x, temperature, top_k, top_p)
    R, V = x.shape
    if len(groups) == 1 and groups[0][1] is None and groups[0][0].size == R:
        return groups[0][2]
    out = np.zeros((R, V), np.float32)
    for rows, ids, probs in groups:
        out[rows] = _dense(ids, probs, V)
    return out


def _dense(ids: np.ndarray | None, probs: np.ndarray, V: int) -> np.ndarray:
    """A group's kept probabilities as [n, V] rows (`_kept`)."""
    if ids is None:
        return probs
    rows = np.zeros((len(probs), V), np.float32)
    np.put_along_axis(rows, ids, probs, axis=1)
    return rows


def _kept(x: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> list:
    """`kept_probs` by groups of rows, each (rows [n], ids, probs) with float32 probs: whole rows
    [n, V] (ids None), or the values at ids [n, M] (distinct ids; 0 where dropped, and 0 at every
    id not listed), which is how top-k and top-p rows come out of their candidates: their dense
    rows are never written."""
    R, V = x.shape
    t = np.maximum(temperature.astype(np.float32), np.float32(np.finfo(np.float32).tiny))[:, None]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = x - x.max(axis=1, keepdims=True)
        z /= t
    hot = ~np.isfinite(t[:, 0])
    if hot.any():                       # inf / inf when the temperature overflows: equal weights
        zh = z[hot]
        zh[np.isnan(zh)] = -np.inf
        z[hot] = zh
    k = np.where((top_k > 0) & (top_k < V), top_k, 0)
    filt = (k > 0) | (top_p < 1.0)
    if not filt.any():
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return [(np.arange(R), None, z)]
    groups = []
    plain = np.nonzero(~filt)[0]
    if plain.size:
        e = np.exp(z[plain])
        groups.append((plain, None, e / e.sum(axis=1, keepdims=True)))
    rows = np.nonzero(filt)[0]
    zf = z if rows.size == R else z[rows]
    ids, probs, redo = _kept_candidates(zf, k[rows], top_p[rows])
    done = ~redo
    groups.append((rows[done], ids[done], probs[done].astype(np.float32)))
    again = rows[redo]
    if again.size:                      # among as many candidates as the nuclei need, then whole
        width = max(2 * ids.shape[1], nucleus_width(z[again], top_p[again]))
        if width < V:
            ids2, probs2, redo2 = _kept_candidates(z[again], k[again], top_p[again], width)
            groups.append((again[~redo2], ids2[~redo2], probs2[~redo2].astype(np.float32)))
            again = again[redo2]
    if again.size:
        groups.append((again, None, np.stack([_kept_row(z[i], int(k[i]), float(top_p[i])) for i in again])))
    return groups


def nucleus_width(z: np.ndarray, top_p: np.ndarray, bins: int = NUCLEUS_BINS) -> int:
    """A candidate count that holds every row's top-p nucleus over its whole mass (z: scaled
    logits, max 0), plus one: a histogram of each row's probability mass over `bins` value bins,
    summed from the top until top_p of the mass. Approximate by a bin at most: it only sizes a
    candidate set, whose exact check (`_kept_candidates`' redo) catches a short count."""
    R, V = z.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(np.isinf(z), 0.0, z).min(axis=1, keepdims=True).astype(np.float32)
        span = np.maximum(-lo, np.float32(np.finfo(np.float32).tiny))
        b = np.nan_to_num((z - lo) / span * np.float32(bins - 1))
    b = np.clip(b, 0, bins - 1).astype(np.int64) + (np.arange(R) * bins)[:, None]     # -inf: bin 0
    mass = np.bincount(b.ravel(), np.exp(z.astype(np.float64)).ravel(), R * bins).reshape(R, bins)
    count = np.bincount(b.ravel(), None, R * bins).reshape(R, bins)
    cum_mass, cum_count = np.cumsum(mass[:, ::-1], axis=1), np.cumsum(count[:, ::-1], axis=1)
    first = np.minimum((cum_mass < top_p[:, None] * cum_mass[:, -1:]).sum(axis=1), bins - 1)
    return int(cum_count[np.arange(R), first].max()) + 1


def _kept_candidates(z: np.ndarray, k: np.ndarray, top_p: np.ndarray, M: int | None = None):
    """Top-k then top-p among each row's best M (default max(CANDIDATES, k)) tokens.

    Returns (ids [R, M], probs [R, M] renormalised, 0 where dropped, redo [R]): redo marks rows
    whose kept set may reach past the candidates, or whose M-th best value ties with a token the
    partition left out (which one is in is then arbitrary; ties must go to the lower id); they
    are ranked whole by `_kept_row`."""
    R, V = z.shape
    M = int(min(V, M if M is not None else max(CANDIDATES, int(k.max()))))
    cand = np.argpartition(z, V - M, axis=1)[:, V - M:] if M < V else np.tile(np.arange(V), (R, 1))
    cand.sort(axis=1)                                   # id order, so a stable sort breaks ties by id
    zc = np.take_along_axis(z, cand, axis=1)
    order = np.argsort(-zc, axis=1, kind="stable")
    ranked = np.take_along_axis(cand, order, axis=1)    # [R, M] ids by p descending, ties by id
    pc = np.exp(np.take_along_axis(zc, order, axis=1).astype(np.float64))
    kk = np.where(k > 0, k, V)
    in_k = np.arange(M)[None, :] < kk[:, None]
    pk = pc * in_k
    mass = pk.sum(axis=1)
    whole = kk > M                                      # top-p over the whole vocabulary's mass
    if whole.any():
        mass[whole] = np.exp(z[whole].astype(np.float64)).sum(axis=1)
    before = (np.cumsum(pk, axis=1) - pk) / mass[:, None]
    keep = in_k & (before < top_p[:, None])
    keep[:, 0] = True
    redo = (keep.sum(axis=1) == M) & (M < V)
    if M < V:
        redo |= split_ties(z, zc)
    probs = np.where(keep, pc, 0.0)
    probs /= probs.sum(axis=1, keepdims=True)
    return ranked, probs, redo


def split_ties(z: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """[R] bool: rows whose smallest chosen value (chosen [R, M] holds the M largest of z [R, V],
    ties broken arbitrarily) is also held by a token left out, so the lower-id rule may pick
    differently. -inf ties never matter (their probability is 0)."""
    kth = chosen.min(axis=1, keepdims=True)
    return (kth[:, 0] > -np.inf) & ((z == kth).sum(axis=1) > (chosen == kth).sum(axis=1))


def ranked_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """[R, k] int64: each row's k largest values' ids, largest first, ties to the lower id (k is
    clipped to the row length)."""
    R, V = x.shape
    k = min(int(k), V)
    if k < V:
        cand = np.argpartition(x, V - k, axis=1)[:, V - k:]
        for i in np.nonzero(split_ties(x, np.take_along_axis(x, cand, axis=1)))[0]:
            cand[i] = np.argsort(-x[i], kind="stable")[:k]
    else:
        cand = np.tile(np.arange(V), (R, 1))
    cand.sort(axis=1)
    order = np.argsort(-np.take_along_axis(x, cand, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1).astype(np.int64)


def entropy(q: np.ndarray) -> np.ndarray:
    """[R] float64 entropy (nats) of probability rows q [R, V] (zeros contribute nothing)."""
    q = q.astype(np.float64)
    return -(q * np.log(np.where(q > 0, q, 1.0))).sum(axis=1)


def _kept_row(z: np.ndarray, k: int, top_p: float) -> np.ndarray:
    """One row's kept probabilities, ranking the whole vocabulary (the exact slow path)."""
    V = z.shape[0]
    ids = np.argsort(-z, kind="stable")                # ties: lower id first
    n = k if 0 < k < V else V
    p = np.exp(z[ids[:n]].astype(np.float64))
    before = (np.cumsum(p) - p) / p.sum()
    m = max(1, int((before < top_p).sum()))
    row = np.zeros(V, np.float32)
    row[ids[:m]] = p[:m] / p[:m].sum()
    return row


def draw(probs: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Step 4: per row, the first token id where the cumulative kept mass exceeds u."""
    return _draw_rows(probs, uniform)[0]


def _draw_rows(probs: np.ndarray, uniform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`draw` over rows of kept probabilities [n, M] in id order, and whether each row's are all
    finite (they are >= 0: exactly when their float64 total is). The cumulative mass is summed in
    float64 in that order. Where no prefix exceeds u (u close to 1), the last token with mass:
    never a zero-probability token past the last kept one. (A first prefix that exceeds u ends
    at a token with mass, so it is never past that one.)"""
    cum = np.cumsum(probs, axis=1, dtype=np.float64)
    total = cum[:, -1]
    with np.errstate(invalid="ignore"):
        idx = (cum <= uniform[:, None] * total[:, None]).sum(axis=1)
    n = cum.shape[1]
    past = np.nonzero(idx == n)[0]
    if past.size:
        idx[past] = n - 1 - np.argmax(probs[past][:, ::-1] > 0, axis=1)
    return idx, np.isfinite(total)


def _draw_kept(groups: list, uniform: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """`draw` for `_kept`'s groups (uniform [R] and the result indexed like `_kept`'s rows): the
    tokens [R] and whether each row's kept probabilities are finite [R]. A group held at ids is
    drawn over its ids in increasing order: the ids it does not list hold 0, which adds nothing
    to a cumulative sum, so the sums, and the token, are those of its dense rows."""
    tokens = np.zeros(R, np.int64)
    good = np.zeros(R, bool)
    for rows, ids, probs in groups:
        if not rows.size:
            continue
        if ids is None:
            tokens[rows], good[rows] = _draw_rows(probs, uniform[rows])
            continue
        order = np.argsort(ids, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        at, good[rows] = _draw_rows(np.take_along_axis(probs, order, axis=1), uniform[rows])
        tokens[rows] = ids[np.arange(rows.size), at]
    return tokens, good


def sample(logits: np.ndarray, batch: SamplingBatch, inplace: bool = False) -> Sampled:
    """Tokens [R] (int64) for logits [R, V] and the batch's rows, `ok` [R] (False where the row
    has no valid distribution: its token is -1; fail that request alone), and the batch's probes.
    `inplace` lets the pass overwrite `logits` instead of copying them."""
    if not batch.bias and not batch.probes and len(batch) and not any(batch.temperature):
        return _greedy(logits, batch)
    return _sample(logits, batch, inplace)


def _sample(logits: np.ndarray, batch: SamplingBatch, inplace: bool = False) -> Sampled:
    x = process(logits, batch, inplace)
    R = x.shape[0]
    ok = valid_rows(x)
    tokens = np.full(R, -1, np.int64)
    temperature = np.asarray(batch.temperature, np.float64)
    greedy = ok & (temperature == 0.0)
    if greedy.any():
        tokens[greedy] = np.argmax(x[greedy], axis=1)
    samp = ok & ~greedy
    probed = np.zeros(R, bool)
    pr = np.asarray([r for r, _ in batch.probes], np.int64)
    pt = np.asarray([t for _, t in batch.probes], np.int64)
    probed[pr] = True
    probe_p = np.full(len(batch.probes), np.nan, np.float32)
    ent = np.full(R, np.nan, np.float64)
    if samp.any():
        rows = np.nonzero(samp)[0]
        groups = _kept(x if rows.size == R else x[rows], temperature[rows],
                       np.asarray(batch.top_k, np.int64)[rows], np.asarray(batch.top_p, np.float64)[rows])
        drawn, good = _draw_kept(groups, np.asarray(batch.uniform, np.float64)[rows], rows.size)
        tokens[rows[good]] = drawn[good]
        ok[rows[~good]] = False
        if pr.size:
            V = x.shape[1]
            want = np.nonzero(probed[rows])[0]     # probed sampled rows: only theirs are made dense
            slot = np.full(rows.size, -1, np.int64)
            slot[want] = np.arange(want.size)
            probs = np.zeros((want.size, V), np.float32)
            for g_rows, ids, p in groups:
                sel = np.nonzero(slot[g_rows] >= 0)[0]
                if sel.size:
                    probs[slot[g_rows[sel]]] = _dense(None if ids is None else ids[sel], p[sel], V)
            at = np.full(R, -1, np.int64)
            at[rows] = np.arange(rows.size)
            hit = at[pr] >= 0
            inside = hit & (pt >= 0) & (pt < V)
            probe_p[hit] = 0.0
            probe_p[inside] = probs[slot[at[pr[inside]]], pt[inside]]
            ent[rows[want]] = entropy(probs)
    g = ok & (temperature == 0.0) & probed            # greedy: the point mass at the token
    ent[g] = 0.0
    gp = g[pr] if pr.size else np.zeros(0, bool)
    probe_p[gp] = (tokens[pr[gp]] == pt[gp]).astype(np.float32)
    if pr.size:
        probe_p[~ok[pr]] = np.nan
    ent[~ok] = np.nan
    return Sampled(tokens, ok, probe_p, ent)


_NO_PROBES = np.zeros(0, np.float32)
_NO_PROBES.flags.writeable = False
_NAN_ENTROPY: dict[int, np.ndarray] = {}   # R -> a read-only [R] of NaN (no greedy row is probed)
_ALL_OK: dict[int, np.ndarray] = {}        # R -> a read-only [R] of True
_ROWS: dict[int, np.ndarray] = {}          # R -> a read-only arange(R)


def _shared(cache: dict, R: int, make) -> np.ndarray:
    """The read-only [R] array `make(R)`, made once per R (at most 64 kept per cache)."""
    a = cache.get(R)
    if a is None:
        if len(cache) > 64:
            cache.clear()
        a = cache[R] = make(R)
        a.flags.writeable = False
    return a


def _all_true(R: int) -> np.ndarray:
    return np.ones(R, bool)


def _all_nan(R: int) -> np.ndarray:
    return np.full(R, np.nan)


_SCAN_BANS = 64   # rows with bans up to which `_greedy` finds a banned argmax in Python


def _greedy(logits: np.ndarray, batch: SamplingBatch) -> Sampled:
    """`sample` for a batch of greedy rows without bias or probes, without copying the logits: a
    row whose first argmax is not banned has the same first argmax and max once its bans are
    applied (bans only lower entries); a row whose argmax is banned is ranked again with its
    bans applied, as `process` applies them.
    A row is valid when the value at its first argmax is finite: that value is the row's max,
    or NaN when the row holds a NaN (argmax stops at the first), and a row all -inf is all
    banned. So the logits are read once (by argmax), not again for the rows' max. Few numpy
    calls: after the forward they run cold, a few microseconds each."""
    x = np.asarray(logits, dtype=np.float32)
    R = x.shape[0]
    tokens = x.argmax(axis=1)
    at_max = None
    if R == 1:
        good = math.isfinite(x[0, tokens[0]])
    else:
        at_max = x[_shared(_ROWS, R, np.arange), tokens]
        good = math.isfinite(at_max.sum(dtype=np.float64))   # float32 values: their float64 sum never overflows
    # the rows whose argmax is banned: a few rows' bans are scanned in Python (numpy calls right
    # after the forward run cold); many rows', in one pass over the batch's (row, token) arrays
    if len(batch.bans) <= _SCAN_BANS:
        first = tokens.tolist()
        redo = [(r, banned) for r, banned in batch.bans if first[r] in banned]
    else:
        ban_rows, ban_tokens = batch.ban_arrays()
        hit = ban_rows[tokens[ban_rows] == ban_tokens]
        redo = batch.banned_at(np.unique(hit)) if hit.size else ()
    if good and not redo:
        ok = _shared(_ALL_OK, R, _all_true)
    else:
        ok = np.isfinite(x[:, tokens[0]] if at_max is None else at_max)
        V = x.shape[1]
        for r, banned in redo:   # `process` on this row alone (no bias), then the same argmax and check
            row = x[r].copy()
            row[[t for t in banned if 0 <= t < V]] = -np.inf
            t = int(row.argmax())
            tokens[r], ok[r] = t, math.isfinite(row[t])
        tokens[~ok] = -1
    return Sampled(tokens.astype(np.int64, copy=False), ok, _NO_PROBES, _shared(_NAN_ENTROPY, R, _all_nan))


def error_message(params: SamplingParams) -> str:
    return (f"sampling gave no valid distribution for this request (temperature={params.temperature:g}, "
            f"top_p={params.top_p:g}, top_k={params.top_k}): its logits are not finite")
