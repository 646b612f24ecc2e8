"""Side-by-side: the onnxruntime backend against the torch backend (eager) on the same model.

Both run the same engine loop on the same prompts; each request decodes exactly `max_tokens`
tokens (EOS ignored). Runs alternate (torch, onnxruntime, torch, ...) so that machine noise
hits both alike, and medians are reported:

* step latency: the median of the backend's `forward` time over a run's engine steps (decode
  steps, mostly: the one prefill step and scheduler hiccups do not move it), median over runs;
* tokens/s: generated tokens over the wall time of the whole `generate` (engine loop included).

An engine folder is built into a temporary folder when none is given.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from apar_rt.bench.generate import _prompts


def _timed(backend):
    """Wrap backend.forward to accumulate its time; returns the list it appends to."""
    spent: list[float] = []
    inner = backend.forward

    def forward(step):
        t = time.perf_counter()
        out = inner(step)
        spent.append(time.perf_counter() - t)
        return out

    backend.forward = forward
    return spent


def _ort_llm(engine: str, threads: int | None, kw: dict):
    """LLM over the onnxruntime backend with `threads` intra-op threads (LLM() takes no backend options);
    with a `medusa_tree` in `kw`, the engine's Medusa heads verify that draft tree."""
    from apar_rt.engine import Engine
    from apar_rt.llm import LLM

    llm = LLM.__new__(LLM)
    llm.raw = False
    llm.engine = Engine.from_pretrained(engine, backend="onnxruntime", device="cpu",
                                        backend_options={"threads": threads},
                                        medusa=kw.get("medusa_tree") is not None, **kw)
    return llm


def bench_backends(model: str, engine: str | None = None, batch_sizes=(1, 8), max_tokens: int = 64,
                   repeats: int = 5, mode: str = "ar", threads: int | None = None, log=print) -> list[dict]:
    import torch

    from apar_rt import LLM, SamplingParams
    from apar_rt.build.manifest import read_manifest

    if threads:
        torch.set_num_threads(threads)
    tmp = None
    if engine is None:
        from apar_rt.build.builder import BuildOptions, build

        tmp = tempfile.TemporaryDirectory(prefix="apar-bench-")
        engine = str(Path(tmp.name) / "engine")
        log(f"building an onnxruntime engine from {model} in {engine} ...")
        build(BuildOptions(model=model, output=engine, max_batch_size=max(batch_sizes)), progress=False,
              log=lambda m: None)
    try:
        m = read_manifest(engine)
        kw = dict(mode=mode, block_size=m.block_size, max_num_seqs=max(batch_sizes), num_blocks=1024)
        sides = {"torch": LLM(model, backend="torch", dtype="float32", device="cpu", **kw),
                 "onnxruntime": _ort_llm(engine, threads, kw)}
        spent = {name: _timed(llm.engine.backend) for name, llm in sides.items()}
        rows = []
        for bs in batch_sizes:
            ids = [sides["torch"].engine.encode(p) for p in _prompts(bs)]
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            stats = {name: {"wall": [], "step": [], "tokens": 0, "steps": 0} for name in sides}

            def run(name):
                llm = sides[name]
                spent[name].clear()
                t = time.perf_counter()
                outs = llm.generate(prompt_token_ids=ids, params=params)
                wall = time.perf_counter() - t
                s = stats[name]
                s["wall"].append(wall)
                s["step"].append(statistics.median(spent[name]))
                s["tokens"] = sum(o.stats["generated_tokens"] for o in outs)
                s["steps"] = len(spent[name])
                return [o.branches for o in outs]

            same = run("torch") == run("onnxruntime")   # warm-up, and the tokens must agree
            for name in sides:
                stats[name]["wall"].clear()
                stats[name]["step"].clear()
            for _ in range(repeats):
                for name in sides:
                    run(name)
            row = {"batch": bs, "mode": mode, "max_tokens": max_tokens, "repeats": repeats,
                   "same_tokens": same, "threads": torch.get_num_threads()}
            for name, s in stats.items():
                row[f"{name}_step_ms"] = 1e3 * statistics.median(s["step"])
                row[f"{name}_tok_s"] = s["tokens"] / statistics.median(s["wall"])
                row["steps"] = s["steps"]
            row["step_speedup"] = row["torch_step_ms"] / row["onnxruntime_step_ms"]
            row["tok_s_speedup"] = row["onnxruntime_tok_s"] / row["torch_tok_s"]
            rows.append(row)
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_rows(rows: list[dict]) -> str:
    head = (f"{'batch':>5} {'steps':>5} {'torch ms/step':>13} {'ort ms/step':>11} {'speedup':>7} "
            f"{'torch tok/s':>11} {'ort tok/s':>9} {'speedup':>7} {'same tokens':>11}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['steps']:>5} {r['torch_step_ms']:>13.3f} "
                     f"{r['onnxruntime_step_ms']:>11.3f} "
                     f"{r['step_speedup']:>6.1f}x {r['torch_tok_s']:>11.1f} {r['onnxruntime_tok_s']:>9.1f} "
                     f"{r['tok_s_speedup']:>6.1f}x {str(r['same_tokens']):>11}")
    return "\n".join(lines)
