"""`apar-rt bench sampler`: the numpy reference sampler against the torch sampler on the same
logits, interleaved in one run (each rep times every case on both sides, back to back).

On CUDA the reference side includes the logits' copy to the host (what the engine did before
the device sampler); on the CPU both sides read the same host tensor.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

CASES = (("greedy", {}), ("top-k 50", {"temperature": 1.0, "top_k": 50}),
         ("top-p 0.9", {"temperature": 1.0, "top_p": 0.9}))


def bench_sampler(rows: int = 256, vocab: int = 32000, reps: int = 7, device: str = "cpu", seed: int = 0,
                  log=print) -> list[dict]:
    """Median ms per pass of each side for each case; tokens are checked equal on every rep."""
    import torch

    from apar_rt.backends.device import resolve_device
    from apar_rt.backends.torch_sampler import DeviceSampler
    from apar_rt.core import SamplingParams
    from apar_rt.sampler import SamplingBatch, sample

    dev = resolve_device(device)
    ds = DeviceSampler(dev)
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dev)
    idx = np.arange(rows)
    batches = {}
    for name, kw in CASES:
        b, g = SamplingBatch(), np.random.default_rng(seed)
        for _ in range(rows):
            b.add(SamplingParams(**kw), (), g)
        batches[name] = b

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return (time.perf_counter() - t0) * 1e3, out

    times = {(name, side): [] for name, _ in CASES for side in ("numpy", "torch")}
    for rep in range(reps + 1):                       # rep 0 warms up and is not counted
        for name, _ in CASES:
            b = batches[name]
            t_np, ref = timed(lambda: sample(logits.cpu().numpy(), b))
            t_t, got = timed(lambda: ds.sample(logits, idx, b))
            if not np.array_equal(ref.tokens, got.tokens):
                raise AssertionError(f"{name}: the torch sampler's tokens differ from the reference's")
            if rep:
                times[(name, "numpy")].append(t_np)
                times[(name, "torch")].append(t_t)
        log(f"rep {rep}/{reps} done")
    out = []
    for name, _ in CASES:
        a, b = statistics.median(times[(name, "numpy")]), statistics.median(times[(name, "torch")])
        out.append({"case": name, "rows": rows, "vocab": vocab, "device": str(dev), "numpy_ms": a,
                    "torch_ms": b,
                    "numpy_over_torch": a / b, "numpy_all_ms": times[(name, "numpy")],
                    "torch_all_ms": times[(name, "torch")]})
    return out


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'case':10s} {'rows x vocab':>14s} {'numpy ms':>9s} {'torch ms':>9s} {'numpy/torch':>11s}"]
    for r in rows:
        lines.append(f"{r['case']:10s} {r['rows']:>6d} x {r['vocab']:<6d} {r['numpy_ms']:9.2f} "
                     f"{r['torch_ms']:9.2f} "
                     f"{r['numpy_over_torch']:11.2f}")
    return "\n".join(lines)
