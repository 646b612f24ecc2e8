"""Random mixed sampling batches, shared by the device-sampler tests and the GPU check: greedy,
temperature, top-k (around the candidate count, V and past it), top-p (nuclei past the
candidates), bias, bans, ties, signed zeros, and invalid rows (NaN, +inf, everything banned)."""

from __future__ import annotations

import numpy as np

from apar_rt.core import SamplingParams as SP
from apar_rt.sampler import CANDIDATES, SamplingBatch


def random_params(rng, V):
    kind = int(rng.integers(0, 9))
    t = float(rng.choice([0.3, 0.7, 1.0, 1.8]))
    if kind == 0:
        return SP()                                                     # greedy
    if kind == 1:
        return SP(temperature=t)
    if kind == 2:
        k = int(rng.choice([1, 2, 5, CANDIDATES, CANDIDATES + 1, V - 1, V, 5 * V]))
        return SP(temperature=t, top_k=k)
    if kind == 3:
        return SP(temperature=t, top_p=float(rng.uniform(0.02, 1.0)))
    if kind == 4:
        k, p = int(rng.choice([3, 40, 100, V])), float(rng.choice([0.3, 0.9, 0.99]))
        return SP(temperature=t, top_k=k, top_p=p)
    if kind == 5:
        return SP(temperature=t, top_p=0.999)                           # a nucleus past the candidates
    if kind == 6:
        return SP(logit_bias={int(rng.integers(0, V)): 30.0})           # greedy with a bias
    if kind == 7:
        bias = {int(rng.integers(0, V)): -4.5, int(rng.integers(0, V)): 2.0} if rng.random() < 0.9 else {}
        return SP(temperature=t, top_k=7, logit_bias=bias)
    return SP(temperature=float(rng.choice([1e-4, 40.0])), top_p=float(rng.choice([0.5, 1.0])))


def random_case(rng, V: int | None = None, R: int | None = None):
    """(logits [N, V] float32, rows [R]: which logits row each batch row reads (shuffled, some
    unused), a mixed SamplingBatch with probes)."""
    V = int(rng.choice([17, 64, 300, 1000])) if V is None else V
    R = int(rng.integers(1, 40)) if R is None else R
    N = R + int(rng.integers(0, 5))
    x = (rng.standard_normal((N, V)) * float(rng.choice([0.1, 1.0, 4.0, 20.0]))).astype(np.float32)
    for i in range(N):
        r = rng.random()
        if r < 0.15:
            x[i] = np.round(x[i])                                       # many ties
        elif r < 0.2:
            x[i] = 0.0                                                  # all tied: ties at the candidate edge
        elif r < 0.23:
            x[i] = np.where(rng.random(V) < 0.5, -0.0, 0.0)             # signed zeros are one value
    rows = rng.permutation(N)[:R]
    batch = SamplingBatch()
    for i in range(R):
        bans = [int(t) for t in rng.integers(0, V, int(rng.choice([0, 1, 3])))]
        r = rng.random()
        if r < 0.04:
            bans = list(range(V))                                       # everything banned: invalid
        elif r < 0.08:
            bans = [t for t in range(V) if t % 7]                       # few tokens left
        elif r < 0.11:
            x[rows[i], int(rng.integers(0, V))] = float(rng.choice([np.nan, np.inf]))   # invalid
        elif r < 0.13:
            x[rows[i], int(rng.integers(0, V))] = -np.inf
        batch.add(random_params(rng, V), bans, rng)
    for _ in range(int(rng.integers(0, 2 * R))):
        batch.probes.append((int(rng.integers(0, R)), int(rng.integers(-1, V + 1))))
    return x, rows, batch
