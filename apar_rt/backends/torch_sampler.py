"""The sampler on the logits' own device: `apar_rt.sampler`'s steps (its module docstring is the
contract, the numpy module the reference) in torch, so only token ids, `ok` flags and the asked-for
probes cross back, and Medusa's ranked top-k for drafting.

The arithmetic follows the reference step by step: float32 logits, bias and scaling; float64
probabilities, masses and cumulative sums; kept probabilities rounded to float32 before the
draw. For the same uniforms the tokens are the reference's; a summation order that differs in
the last bit could only move a draw that lands within rounding of a cumulative-mass boundary.

Rows are grouped on the host by their parameters alone (greedy / unfiltered / top-k-top-p), so
a pass reads nothing back from the device until its one result copy. Top-k/top-p rows rank a
candidate set first (`CANDIDATES`, or k); a row whose kept set may reach past its candidates,
or whose candidate edge splits a tie, goes again among as many candidates as a histogram of its
probability mass says its nucleus needs, then ranked whole if still needed (each a further small
copy; rare with peaked distributions, common with flat ones). The histogram only sizes the
candidate set: which tokens are kept is decided, exactly, as in the first pass.
On CUDA the inputs go up in one copy from pinned memory and the results come back in one.
"""

from __future__ import annotations

import numpy as np
import torch

from apar_rt.backends.cuda_step import CopyFence
from apar_rt.sampler import CANDIDATES, NUCLEUS_BINS, Sampled, SamplingBatch

NEG_INF = float("-inf")


class _Staging:
    """One pinned host buffer per direction (plain memory on the CPU). The upload buffer is
    rewritten only after its last copy completed (an event; normally long done, since each pass
    ends by waiting for its result copy)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.up = torch.empty(0, dtype=torch.float64)
        self.down = torch.empty(0, dtype=torch.float64)
        self.copied = CopyFence(device)

    def _host(self, attr: str, n: int) -> torch.Tensor:
        buf = getattr(self, attr)
        if buf.numel() < n:
            buf = torch.empty(max(n, 2 * buf.numel()), dtype=torch.float64)
            buf = buf.pin_memory() if self.cuda else buf
            setattr(self, attr, buf)
        return buf[:n]

    def upload(self, parts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Device float64 views of named host arrays, packed into the staging buffer and sent in
        one copy (on the CPU the views are of the staging buffer itself: valid until the next
        upload)."""
        n = sum(a.size for a in parts.values())
        self.copied.wait()
        host = self._host("up", n)
        h, off = host.numpy(), 0
        for a in parts.values():
            h[off:off + a.size] = a.reshape(-1)
            off += a.size
        if self.cuda:
            flat = torch.empty(n, dtype=torch.float64, device=self.device)
            flat.copy_(host, non_blocking=True)
            self.copied.record()
        else:
            flat = host
        out, off = {}, 0
        for name, a in parts.items():
            out[name] = flat[off:off + a.size]
            off += a.size
        return out

    def download(self, parts: list[torch.Tensor]) -> np.ndarray:
        """Device tensors, flattened as float64 into one host array (one copy, then a wait)."""
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts])
        host = self._host("down", flat.numel())
        host.copy_(flat, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return host.numpy().copy()


class DeviceSampler:
    """Samples rows of a logits tensor where it lives (CPU or one CUDA device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._stage = _Staging(self.device)

    # ---- sampling ----------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows, batch: SamplingBatch) -> Sampled:
        """Sample batch row i from logits row rows[i] (logits [N, V], any float dtype, on this
        sampler's device). Same result as `apar_rt.sampler.sample(logits[rows], batch)`."""
        R, V = len(batch), int(logits.shape[1])
        P = len(batch.probes)
        if R == 0:
            return Sampled(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float32),
                           np.zeros(0))
        if not P and not any(batch.temperature):                      # all greedy: the short path
            d = self._stage.upload({"rows": np.asarray(rows, np.int64), **_edits(batch, V)})
            x = _processed(logits, d)
            ok = torch.isfinite(x.amax(dim=1))
            tokens = torch.where(ok, x.argmax(dim=1), -1)
            out = self._stage.download([tokens, ok])
            return Sampled(out[:R].astype(np.int64), out[R:] != 0, np.zeros(0, np.float32),
                           np.full(R, np.nan))
        plan = _Plan(batch, V)
        d = self._stage.upload(plan.parts(np.asarray(rows, np.int64)))
        dev = self.device
        x = _processed(logits, d)
        mx = x.amax(dim=1)
        ok = torch.isfinite(mx)
        tokens = torch.full((R,), -1, dtype=torch.int64, device=dev)
        probes = torch.full((P,), float("nan"), dtype=torch.float32, device=dev)
        ent = torch.full((R,), float("nan"), dtype=torch.float64, device=dev)
        redo = torch.zeros(R, dtype=torch.bool, device=dev)
        temp, kk, top_p, u = d["temperature"].float(), d["top_k"].long(), d["top_p"], d["uniform"]

        g = plan.groups["greedy"]
        if g.size:
            gi = d["g_rows"].long()
            tok = x.index_select(0, gi).argmax(dim=1)
            tokens.index_copy_(0, gi, tok)
            if plan.probe_of["greedy"][0].size:
                pj, pl, pt = (d["g_probe"].long(), d["g_probe_row"].long(), d["g_probe_tok"].long())
                probes.index_copy_(0, pj, (tok.index_select(0, pl) == pt).float())
                ent.index_fill_(0, gi.index_select(0, d["g_ent"].long()), 0.0)
        zf = None
        for name in ("plain", "filtered"):
            if not plan.groups[name].size:
                continue
            key = name[0]
            gi = d[f"{key}_rows"].long()
            z = _scaled(x.index_select(0, gi), mx.index_select(0, gi), temp.index_select(0, gi),
                        plan.hot[name])
            if name == "plain":
                ids = None
                q = z.exp_()
                q /= q.sum(dim=1, keepdim=True)
            else:
                zf = z
                whole = d["whole"].long() if plan.whole.size else None
                ids, q, full = _filtered(z, kk.index_select(0, gi), top_p.index_select(0, gi), plan.M, whole)
                redo.index_copy_(0, gi, full)
            tok, good = _draw(ids, q, u.index_select(0, gi))
            tokens.index_copy_(0, gi, tok)
            ok.index_copy_(0, gi, ok.index_select(0, gi) & good)
            self._probe(d, key, plan.probe_of[name], ids, q, gi, probes, ent)
        tokens = torch.where(ok, tokens, -1)
        out = self._stage.download([tokens, ok, redo, probes, ent])
        res = _unpack(out, R, P)
        if res[2].any():                                              # the rare second pass
            self._redo(res, zf, kk, top_p, u, batch, plan)
        tokens, okh, _, probes_h, ent_h = res
        probes_h[~okh[plan.probe_rows]] = np.nan
        ent_h[~okh] = np.nan
        return Sampled(np.where(okh, tokens, -1), okh, probes_h, ent_h)

    def _probe(self, d, key, probe_of, ids, q, gi, probes, ent) -> None:
        """Fill the probes and entropies of one group's rows (q: kept probabilities, ids: their
        token ids or None for the whole vocabulary in order)."""
        if probe_of[0].size:
            pj, pl = d[f"{key}_probe"].long(), d[f"{key}_probe_row"].long()
            pt = d[f"{key}_probe_tok"].long()
            probes.index_copy_(0, pj, _probe_values(ids, q, pl, pt))
            el = d[f"{key}_ent"].long()
            ent.index_copy_(0, gi.index_select(0, el), _entropy(q.index_select(0, el)))

    def _redo(self, res, zf, kk, top_p, u, batch, plan: _Plan) -> None:
        """The filtered rows flagged in the first pass, among as many candidates as their nuclei
        need (`_nucleus_width`), then (if still not enough, or a tie splits) the whole row ranked;
        updates `res` in place."""
        tokens, ok, redo, probes, ent = res
        fr = plan.groups["filtered"]
        local = np.nonzero(redo[fr] & ok[fr])[0]
        V = zf.shape[1]
        dev = self.device
        if not local.size:
            return
        z = zf.index_select(0, torch.as_tensor(local, device=dev))
        tp = top_p.index_select(0, torch.as_tensor(fr[local], device=dev))
        wide = max(2 * plan.M, _nucleus_width(z, tp))
        for W in sorted({min(V, wide), V}):
            if not local.size:
                return
            rows = fr[local]
            z = zf.index_select(0, torch.as_tensor(local, device=dev))
            gi = torch.as_tensor(rows, device=dev)
            whole = np.nonzero(np.where(plan.k[rows] > 0, plan.k[rows], V) > W)[0]
            ids, q, again = _filtered(z, kk.index_select(0, gi), top_p.index_select(0, gi), W,
                                      torch.as_tensor(whole, device=dev) if whole.size else None)
            tok, good = _draw(ids, q, u.index_select(0, gi))
            where = np.full(len(batch), -1, np.int64)
            where[rows] = np.arange(rows.size)
            pj = np.nonzero(where[plan.probe_rows] >= 0)[0]
            erows = np.nonzero(plan.probed[rows])[0]
            parts = [tok, good, again]
            if pj.size:
                parts.append(_probe_values(ids, q, torch.as_tensor(where[plan.probe_rows[pj]], device=dev),
                                           torch.as_tensor(plan.probe_toks[pj], device=dev)))
            if erows.size:
                parts.append(_entropy(q.index_select(0, torch.as_tensor(erows, device=dev))))
            out = self._stage.download(parts)
            n = rows.size
            done = out[2 * n:3 * n] == 0
            tokens[rows[done]] = out[:n][done].astype(np.int64)
            ok[rows[done]] = out[n:2 * n][done] != 0
            off = 3 * n
            if pj.size:
                fin = done[where[plan.probe_rows[pj]]]
                probes[pj[fin]] = out[off:off + pj.size][fin]
                off += pj.size
            if erows.size:
                ent[rows[erows[done[erows]]]] = out[off:off + erows.size][done[erows]]
            local = local[~done]

    # ---- Medusa drafting ---------------------------------------------------------------------

    @torch.inference_mode()
    def ranked_top_k(self, x: torch.Tensor, k: int) -> np.ndarray:
        """[R, k] int64: the ids of each row's k largest values of x [R, V], largest first, ties
        to the lower id; the same as `apar_rt.sampler.ranked_top_k` (k is clipped to V)."""
        R, V = x.shape
        k = min(int(k), V)
        if R == 0:
            return np.zeros((0, k), np.int64)
        x = x.float()
        x = torch.where(x == 0, 0.0, x)                              # -0.0 and 0.0 are one value
        vals, cand = x.topk(k, dim=1)
        split = _split_ties(x, vals)
        ranked = _rank_candidates(x, cand)
        out = self._stage.download([ranked, split])
        ids = out[:R * k].astype(np.int64).reshape(R, k)
        fix = np.nonzero(out[R * k:] != 0)[0]
        if fix.size:
            sub = x.index_select(0, torch.as_tensor(fix, device=x.device))
            best = torch.sort(sub, dim=1, descending=True, stable=True).indices[:, :k]
            ids[fix] = self._stage.download([best]).astype(np.int64).reshape(fix.size, k)
        return ids


class _Plan:
    """Host-side bookkeeping of one pass: the groups, their probes, and the upload."""

    def __init__(self, batch: SamplingBatch, V: int) -> None:
        self.batch, self.V = batch, V
        R = len(batch)
        t = np.asarray(batch.temperature, np.float64)
        k = np.asarray(batch.top_k, np.int64)
        self.top_p = np.asarray(batch.top_p, np.float64)
        self.k = np.where((k > 0) & (k < V), k, 0)
        greedy = t == 0.0
        filt = ~greedy & ((self.k > 0) | (self.top_p < 1.0))
        self.groups = {"greedy": np.nonzero(greedy)[0], "plain": np.nonzero(~greedy & ~filt)[0],
                       "filtered": np.nonzero(filt)[0]}
        t32 = t.astype(np.float32)
        self.hot = {name: bool(np.isinf(t32[rows]).any()) for name, rows in self.groups.items()}
        fk = self.k[self.groups["filtered"]]
        self.M = int(min(V, max(CANDIDATES, int(fk.max()) if fk.size else 0)))
        kk = np.where(fk > 0, fk, V)
        self.whole = np.nonzero(kk > self.M)[0]                      # local rows: top-p over the whole mass
        self.probe_rows = np.asarray([r for r, _ in batch.probes], np.int64)
        self.probe_toks = np.asarray([tk for _, tk in batch.probes], np.int64)
        self.probed = np.zeros(R, bool)
        self.probed[self.probe_rows] = True
        self.probe_of = {}
        for name, rows in self.groups.items():
            where = np.full(R, -1, np.int64)
            where[rows] = np.arange(rows.size)
            j = np.nonzero(where[self.probe_rows] >= 0)[0] if self.probe_rows.size else np.zeros(0, np.int64)
            self.probe_of[name] = (j, where[self.probe_rows[j]], self.probe_toks[j],
                                   np.nonzero(self.probed[rows])[0])

    def parts(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        b, V = self.batch, self.V
        p = {"rows": rows, "temperature": np.asarray(b.temperature, np.float64), "top_k": self.k,
             "top_p": self.top_p, "uniform": np.asarray(b.uniform, np.float64), **_edits(b, V),
             "whole": self.whole}
        for name, g in self.groups.items():
            key = name[0]
            j, local, tok, erows = self.probe_of[name]
            p[f"{key}_rows"] = g
            p[f"{key}_probe"], p[f"{key}_probe_row"], p[f"{key}_probe_tok"] = j, local, np.clip(tok, -1, V)
            p[f"{key}_ent"] = erows
        return p


def _edits(b: SamplingBatch, V: int) -> dict[str, np.ndarray]:
    """Step 1's bias and bans as flat arrays (entries naming a token outside [0, V) dropped)."""
    bias = np.asarray(b.bias, np.float64).reshape(-1, 3)
    bias = bias[(bias[:, 1] >= 0) & (bias[:, 1] < V)]
    ban_row, ban_tok = b.ban_arrays()
    keep = (ban_tok >= 0) & (ban_tok < V)
    return {"bias_row": bias[:, 0], "bias_tok": bias[:, 1], "bias_val": bias[:, 2].astype(np.float32),
            "ban_row": ban_row[keep], "ban_tok": ban_tok[keep]}


def _processed(logits: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step 1: the batch's rows of logits as float32 (a copy), bias added, bans at -inf."""
    x = logits.index_select(0, d["rows"].long()).float()
    if d["bias_row"].numel():
        x.index_put_((d["bias_row"].long(), d["bias_tok"].long()), d["bias_val"].float(), accumulate=True)
    if d["ban_row"].numel():
        x.index_put_((d["ban_row"].long(), d["ban_tok"].long()), x.new_full((), NEG_INF))
    return x


def _unpack(out: np.ndarray, R: int, P: int):
    tokens = out[:R].astype(np.int64)
    ok = out[R:2 * R] != 0
    redo = out[2 * R:3 * R] != 0
    probes = out[3 * R:3 * R + P].astype(np.float32)
    ent = out[3 * R + P:]
    return [tokens, ok, redo, probes, ent]


def _scaled(x: torch.Tensor, mx: torch.Tensor, t: torch.Tensor, hot: bool) -> torch.Tensor:
    """(x - max) / max(t, tiny) in float32, -0.0 folded into 0.0; NaN (-inf / inf at an infinite
    temperature) becomes -inf."""
    z = x - mx[:, None]
    z /= t.clamp(min=float(np.finfo(np.float32).tiny))[:, None]
    if hot:
        z = z.masked_fill(torch.isnan(z), NEG_INF)
    return torch.where(z == 0, 0.0, z)


def _nucleus_width(z: torch.Tensor, top_p: torch.Tensor) -> int:
    """`apar_rt.sampler.nucleus_width` on the device (one read back): a candidate count that holds
    every row's top-p nucleus, from a histogram of its mass over NUCLEUS_BINS value bins."""
    R, V = z.shape
    e = z.exp()
    lo = z.masked_fill(torch.isinf(z), 0.0).amin(dim=1, keepdim=True)
    span = (-lo).clamp(min=float(np.finfo(np.float32).tiny))
    b = ((z - lo) / span * (NUCLEUS_BINS - 1)).nan_to_num_(0.0)
    b = b.clamp_(0, NUCLEUS_BINS - 1).long()                           # -inf (no mass): bin 0
    mass = torch.zeros(R, NUCLEUS_BINS, dtype=torch.float64, device=z.device).scatter_add_(1, b, e.double())
    count = torch.zeros(R, NUCLEUS_BINS, dtype=torch.int64, device=z.device).scatter_add_(
        1, b, torch.ones_like(b))
    cum_mass, cum_count = mass.flip(1).cumsum(dim=1), count.flip(1).cumsum(dim=1)
    first = (cum_mass < top_p[:, None] * cum_mass[:, -1:]).sum(dim=1).clamp(max=NUCLEUS_BINS - 1)
    return int(cum_count.gather(1, first[:, None]).max()) + 1


def _split_ties(x: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Rows whose k-th largest value (vals: the k largest, sorted) is also held by a token left out."""
    kth = vals[:, -1:]
    return (kth[:, 0] > NEG_INF) & ((x == kth).sum(dim=1) > (vals == kth).sum(dim=1))


def _rank_candidates(x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Candidate ids [R, M] ranked by value, largest first, ties to the lower id."""
    cand = cand.sort(dim=1).values
    order = torch.sort(x.gather(1, cand), dim=1, descending=True, stable=True).indices
    return cand.gather(1, order)


def _filtered(z: torch.Tensor, kk: torch.Tensor, top_p: torch.Tensor, M: int, whole: torch.Tensor | None):
    """Top-k / top-p rows among their M best candidates: (ids [R, M] kept first, in id order;
    kept probabilities [R, M] float32, 0 where dropped; redo [R]). `whole`: local rows whose
    top-k reaches past the candidates (their top-p mass is the whole row's)."""
    R, V = z.shape
    if M < V:
        vals, cand = z.topk(M, dim=1)
        split = _split_ties(z, vals)
        ranked = _rank_candidates(z, cand)
    else:
        split = torch.zeros(R, dtype=torch.bool, device=z.device)
        ranked = torch.sort(z, dim=1, descending=True, stable=True).indices
    mass = (whole, z.index_select(0, whole).double().exp().sum(dim=1)) if whole is not None else None
    keep, q, full = _kept(z.gather(1, ranked), ranked, kk, top_p, mass, V)
    redo = (full & (M < V)) | split
    ids, q = _id_order(ranked, keep, q)
    return ids, q, redo


def _kept(zr, ranked, kk, top_p, whole, V):
    """Step 3 on ranked values zr [R, M] (largest first): (keep [R, M], kept probabilities [R, M]
    float32 renormalised, full [R]: every candidate kept). `whole`: (local rows, their whole-row
    mass) for rows whose top-k reaches past the candidates."""
    M = zr.shape[1]
    pc = zr.double().exp()
    kk = torch.where(kk > 0, kk, V)
    in_k = torch.arange(M, device=zr.device)[None, :] < kk[:, None]
    pk = pc * in_k
    mass = pk.sum(dim=1)
    if whole is not None:
        mass = mass.index_copy(0, whole[0], whole[1])
    before = (pk.cumsum(dim=1) - pk) / mass[:, None]
    keep = in_k & (before < top_p[:, None])
    keep[:, 0] = True
    full = keep.sum(dim=1) == M
    probs = torch.where(keep, pc, 0.0)
    probs /= probs.sum(dim=1, keepdim=True)
    return keep, probs.float(), full


def _id_order(ranked, keep, q):
    """Kept tokens first, in id order (dropped ones last, with probability 0)."""
    _, order = torch.where(keep, ranked, torch.iinfo(torch.int64).max).sort(dim=1)
    return ranked.gather(1, order), q.gather(1, order)


def _draw(ids, q, u):
    """Step 4 over kept probabilities q [R, W] float32 in id order (ids None: the whole
    vocabulary): (tokens [R], good [R]: the probabilities were finite)."""
    W = q.shape[1]
    cum = q.double().cumsum(dim=1)
    target = u[:, None] * cum[:, -1:]
    idx = (cum <= target).sum(dim=1)
    last = torch.where(q > 0, torch.arange(W, device=q.device), -1).amax(dim=1)
    pos = torch.minimum(idx, last).clamp(min=0)
    tok = pos if ids is None else ids.gather(1, pos[:, None])[:, 0]
    return tok, torch.isfinite(q).all(dim=1)


def _probe_values(ids, q, rows, toks):
    """q at (row, token) pairs (0 where the token is not kept)."""
    if ids is None:
        inside = (toks >= 0) & (toks < q.shape[1])
        return torch.where(inside, q[rows, toks.clamp(0, q.shape[1] - 1)], 0.0)
    return ((ids.index_select(0, rows) == toks[:, None]) * q.index_select(0, rows)).sum(dim=1)


def _entropy(q: torch.Tensor) -> torch.Tensor:
    """[R] float64 entropy of probability rows (as `apar_rt.sampler.entropy`)."""
    q = q.double()
    return -(q * torch.where(q > 0, q, 1.0).log()).sum(dim=1)
