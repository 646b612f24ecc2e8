"""`apar-rt bench overhead`: the engine's own cost per step, with no model work.

A backend that returns random logits stands in for the model, so what is timed is everything
else in `Engine.step`: scheduling, packing the step, sampling, appending tokens, stop strings,
and (with streaming) the reading-order streamer the servers run after each step. The forward's
own time is subtracted. Requests decode in AR mode so that the number of running sequences is
exactly the one asked for; contexts are reached by prefilling prompts of that length first.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace

import numpy as np

from apar_rt.backends.base import Backend
from apar_rt.core import SamplingParams, StepInput

MAX_NUM_TOKENS = 8192
# stop strings of a chat deployment; random tokens never complete them. How often the text is
# checked depends on how often a new token holds one of their last characters (stop_filter.py):
# a stop string that ends in whitespace is checked after every token (`--stop`).
DEFAULT_STOPS = ("\nUser:", "</s>")


class RandomLogitsBackend(Backend):
    """Logits drawn once at random and served in rotation: no model, no K/V."""

    name = "random"

    def __init__(self, vocab_size: int, seed: int = 0, rows: int = 4096) -> None:
        rng = np.random.default_rng(seed)
        self._pool = rng.standard_normal((rows, vocab_size), dtype=np.float32)
        self._at = 0
        self.forward_seconds = 0.0

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        pass

    def forward(self, step: StepInput):
        t = time.perf_counter()
        n = int(step.logits_indices.shape[0])
        rows = self._pool.shape[0]
        start = self._at
        self._at = (self._at + n) % rows
        idx = (np.arange(start, start + n) % rows)
        out = self._pool[idx]
        self.forward_seconds += time.perf_counter() - t
        return out


def _engine(model: str, num_seqs: int, context: int, steps: int, vocab: int | None):
    from apar_rt.config import EngineConfig, ModelConfig
    from apar_rt.engine import Engine, freeze_heap
    from apar_rt.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    mc = ModelConfig.from_dir(model)
    # Sequences prefilled early decode while the others prefill: leave room for those tokens.
    max_len = context + steps + num_seqs * context // MAX_NUM_TOKENS + 64
    mc = replace(mc, max_position_embeddings=max(mc.max_position_embeddings, max_len),
                 vocab_size=vocab or mc.vocab_size)
    bs = 16
    blocks = num_seqs * (-(-max_len // bs)) + 16
    cfg = EngineConfig(num_blocks=blocks, block_size=bs, max_num_seqs=num_seqs, max_num_tokens=MAX_NUM_TOKENS,
                       max_model_len=max_len, mode="ar", watermark=0.0)
    backend = RandomLogitsBackend(mc.vocab_size)
    freeze_heap()   # as Engine.from_pretrained does
    return Engine(backend, tok, mc, cfg), backend


def measure(model: str, num_seqs: int, context: int, *, stop: bool, stream: bool, steps: int = 30,
            vocab: int | None = None, seed: int = 0, stops: tuple[str, ...] = DEFAULT_STOPS) -> dict:
    """Median engine milliseconds per decode step (forward excluded) for one configuration."""
    from apar_rt.serve.streamer import ReadingOrderStreamer

    eng, backend = _engine(model, num_seqs, context, steps, vocab)
    rng = np.random.default_rng(seed)
    special = set(eng.special_ids)
    ordinary = np.array([t for t in range(min(len(eng.tokenizer), eng.model_config.vocab_size))
                         if t not in special])
    params = SamplingParams(max_tokens=eng.config.max_model_len, ignore_eos=True, stop=stops if stop else ())
    streamers = {}
    for _ in range(num_seqs):
        ids = rng.choice(ordinary, context).tolist()
        rid = eng.add_request(None, params, prompt_token_ids=ids)
        if stream:
            streamers[rid] = ReadingOrderStreamer.for_engine(eng, eng._requests[rid])
    reqs = dict(eng._requests)
    while any(not r.branches[0].token_ids for r in reqs.values()):   # prefill until all decode
        eng.step()
    times = []
    checks = eng.scheduler.num_stop_checks
    for _ in range(steps):
        backend.forward_seconds = 0.0
        t = time.perf_counter()
        outs = eng.step()
        if stream:
            for o in outs:
                streamers[o.request_id].step(o.deltas)
        times.append(time.perf_counter() - t - backend.forward_seconds)
    assert all(len(o.deltas) for o in outs) and len(outs) == num_seqs, "every sequence must decode each step"
    checked = (eng.scheduler.num_stop_checks - checks) / (steps * num_seqs)
    for rid in list(reqs):
        eng.abort_request(rid)
    return {"seqs": num_seqs, "context": context, "stop": stop, "stream": stream,
            "vocab": eng.model_config.vocab_size, "ms_per_step": 1000 * statistics.median(times),
            "ms_per_step_mean": 1000 * statistics.fmean(times), "ms_per_step_min": 1000 * min(times),
            "stop_checks_per_token": checked if stop else None}


def bench_overhead(model: str, seqs=(1, 32, 256), contexts=(128, 1024, 4096), steps: int = 30,
                   vocab: int | None = None, stops: tuple[str, ...] = DEFAULT_STOPS, repeats: int = 3,
                   log=print) -> list[dict]:
    """Every (seqs, context) at each of: plain, stop strings, streaming, both.

    The grid runs `repeats` times over; each row is the median of its runs' medians, the mean of
    their means (which counts the rare slow step, such as a garbage collection) and the least
    step seen. The four variants of one (seqs, context) run one after another, contexts
    are interleaved per seqs, and the repeats interleave the whole grid, so machine noise (a
    shared machine's speed drifts over minutes) hits the compared figures alike."""
    runs: dict[tuple, list[dict]] = {}
    for rep in range(repeats):
        for n in seqs:
            for ctx in contexts:
                for stop, stream in ((False, False), (True, False), (False, True), (True, True)):
                    r = measure(model, n, ctx, stop=stop, stream=stream, steps=steps, vocab=vocab, stops=stops)
                    log(f"run {rep + 1}/{repeats}: " + format_rows([r], header=False))
                    runs.setdefault((n, ctx, stop, stream), []).append(r)
    rows = []
    for rs in runs.values():
        row = dict(rs[0], ms_per_step=statistics.median(r["ms_per_step"] for r in rs),
                   ms_per_step_mean=statistics.fmean(r["ms_per_step_mean"] for r in rs),
                   ms_per_step_min=min(r["ms_per_step_min"] for r in rs), repeats=len(rs))
        if row["stop"]:
            row["stop_checks_per_token"] = statistics.median(r["stop_checks_per_token"] for r in rs)
        rows.append(row)
    return rows


def format_rows(rows: list[dict], header: bool = True) -> str:
    lines = [f"{'seqs':>5} {'context':>7} {'stop':>5} {'stream':>6} {'vocab':>6} {'ms/step':>8} {'mean':>7} "
             f"{'min':>7} {'checked':>7}"] if header else []
    for r in rows:
        checked = "" if r["stop_checks_per_token"] is None else f"{r['stop_checks_per_token']:.1%}"
        lines.append(f"{r['seqs']:>5} {r['context']:>7} {str(r['stop']):>5} {str(r['stream']):>6} {r['vocab']:>6} "
                     f"{r['ms_per_step']:>8.3f} {r['ms_per_step_mean']:>7.3f} {r['ms_per_step_min']:>7.3f} {checked:>7}")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """Each context's figure over the smallest context's, per (seqs, stop, stream)."""
    base = {}
    out = []
    for r in rows:
        key = (r["seqs"], r["stop"], r["stream"])
        base.setdefault(key, r)
        b = base[key]
        if b is not r:
            out.append(f"seqs {r['seqs']:>3} stop={r['stop']!s:<5} stream={r['stream']!s:<5} "
                       f"context {r['context']}/{b['context']}: {r['ms_per_step'] / b['ms_per_step']:.2f}x")
    return "\n".join(out)


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
