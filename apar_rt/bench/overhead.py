"""`apar-rt bench overhead`: the engine's own cost per step, with no model work.

A backend that returns random logits stands in for the model, so what is timed is everything
else in `Engine.step`: scheduling, packing the step, sampling, appending tokens, stop strings,
and (with streaming) the reading-order streamer the servers run after each step (or, as a server
with `--stream-interval N` runs it, after every N-th step of each request, the requests staggered).
The forward's own time is subtracted. Requests decode in AR mode so that the number of running sequences is
exactly the one asked for; contexts are reached by prefilling prompts of that length first.
"""

from __future__ import annotations

import gc
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
    from apar_rt.engine import Engine
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
    return Engine(backend, tok, mc, cfg), backend


def _fresh_heap() -> None:
    """Before a configuration's engines are made: reclaim the last configuration's (garbage now,
    reference cycles included), then freeze what is left, as Engine.from_pretrained does before it
    makes its engine (`freeze_heap`). Freezing while engines are alive would keep them for good:
    frozen objects are never collected, so every later row would run beside all earlier rows'
    engines (at 32 sequences, 80 MB a configuration)."""
    from apar_rt.engine import freeze_heap

    gc.unfreeze()
    freeze_heap()


class _Load:
    """One configuration's engine (`num_seqs` requests decoding at `context` tokens, with or
    without stop strings and streaming), prefilled and ready for `timed_step`; room for `steps`
    decode steps."""

    def __init__(self, model: str, num_seqs: int, context: int, *, stop: bool, stream: bool, steps: int,
                 vocab: int | None, seed: int, stops: tuple[str, ...], stream_interval: int = 1) -> None:
        from apar_rt.serve.streamer import ReadingOrderStreamer

        self.context = context
        self.eng, self.backend = _engine(model, num_seqs, context, steps, vocab)
        eng = self.eng
        rng = np.random.default_rng(seed)
        special = set(eng.special_ids)
        ordinary = np.array([t for t in range(min(len(eng.tokenizer), eng.model_config.vocab_size))
                             if t not in special])
        params = SamplingParams(max_tokens=eng.config.max_model_len, ignore_eos=True, stop=stops if stop else ())
        self.streamers = {}
        self.stream_interval = stream_interval
        # request -> the step (mod stream_interval) after which its text goes out; None: every step
        self.phase: dict | None = {} if stream_interval > 1 else None
        for i in range(num_seqs):
            ids = rng.choice(ordinary, context).tolist()
            rid = eng.add_request(None, params, prompt_token_ids=ids)
            if stream:
                self.streamers[rid] = ReadingOrderStreamer.for_engine(eng, eng._requests[rid])
                if self.phase is not None:
                    self.phase[rid] = i % stream_interval
        self.reqs = dict(eng._requests)
        while any(not r.branches[0].token_ids for r in self.reqs.values()):   # prefill until all decode
            eng.step()
        self.checks = eng.scheduler.num_stop_checks
        self.steps = 0

    def timed_step(self) -> float:
        """Seconds of one decode step, the forward excluded (and the streamers' work included)."""
        backend, streamers = self.backend, self.streamers
        backend.forward_seconds = 0.0
        t = time.perf_counter()
        outs = self.eng.step()
        if streamers:
            now, phase = self.steps % self.stream_interval, self.phase
            for o in outs:
                if phase is None or phase[o.request_id] == now:
                    streamers[o.request_id].step(o.deltas)
        took = time.perf_counter() - t - backend.forward_seconds
        assert len(outs) == len(self.reqs) and all(len(o.deltas) for o in outs), \
            "every sequence must decode each step"
        self.steps += 1
        return took

    def close(self) -> float:
        """Abort the requests; returns the share of tokens whose text was checked for stop strings."""
        checked = (self.eng.scheduler.num_stop_checks - self.checks) / max(1, self.steps * len(self.reqs))
        for rid in list(self.reqs):
            self.eng.abort_request(rid)
        return checked


def bench_overhead(model: str, seqs=(1, 32, 256), contexts=(128, 1024, 4096), steps: int = 100,
                   vocab: int | None = None, stops: tuple[str, ...] = DEFAULT_STOPS, repeats: int = 3,
                   seed: int = 0, log=print, stream_interval: int = 1) -> list[dict]:
    """Every (seqs, context) at each of: plain, stop strings, streaming, both. Streaming runs each
    request's streamer after every `stream_interval`-th step (the requests staggered).

    The contexts of one (seqs, variant) are measured side by side: their engines are loaded
    together and take turns, `steps` steps each, `repeats` rounds (the order rotating), so a
    shared machine's drift over minutes hits them alike. A row gives the median step over all its
    rounds, the mean step (which counts the rare slow one, such as a garbage collection) and the
    least; `ratio` is the median over rounds of its round median over the first context's, taken
    in the same round."""
    rows = []
    for n in seqs:
        for stop, stream in ((False, False), (True, False), (False, True), (True, True)):
            _fresh_heap()
            rows += _configuration(model, n, contexts, stop, stream, steps, repeats, vocab, seed, stops, log,
                                   stream_interval)
    return rows


def _configuration(model: str, n: int, contexts, stop: bool, stream: bool, steps: int, repeats: int,
                   vocab: int | None, seed: int, stops: tuple[str, ...], log, stream_interval: int = 1) -> list[dict]:
    """`bench_overhead`'s rows of one (seqs, variant): its contexts side by side. Its engines live
    in this frame only, so they are garbage once it returns."""
    loads = [_Load(model, n, ctx, stop=stop, stream=stream, steps=steps * repeats, vocab=vocab,
                   seed=seed, stops=stops, stream_interval=stream_interval) for ctx in contexts]
    times: list[list[float]] = [[] for _ in loads]
    rounds: list[list[float]] = [[] for _ in loads]   # per load, its median step in each round
    for rep in range(repeats):
        for i in [(rep + j) % len(loads) for j in range(len(loads))]:
            ts = [loads[i].timed_step() for _ in range(steps)]
            times[i] += ts
            rounds[i].append(statistics.median(ts))
    rows = []
    for load, ts, rs in zip(loads, times, rounds):
        checked = load.close()
        rows.append({"seqs": n, "context": load.context, "stop": stop, "stream": stream,
                     "stream_interval": stream_interval if stream else None,
                     "vocab": load.eng.model_config.vocab_size, "steps": len(ts), "repeats": repeats,
                     "ms_per_step": 1000 * statistics.median(ts),
                     "ms_per_step_mean": 1000 * statistics.fmean(ts),
                     "ms_per_step_min": 1000 * min(ts),
                     "stop_checks_per_token": checked if stop else None,
                     "ratio": statistics.median(r / b for r, b in zip(rs, rounds[0]))})
        log(format_rows([rows[-1]], header=False))
    return rows


def format_rows(rows: list[dict], header: bool = True) -> str:
    lines = [f"{'seqs':>5} {'context':>7} {'stop':>5} {'stream':>6} {'vocab':>6} {'ms/step':>8} {'mean':>7} "
             f"{'min':>7} {'checked':>7}"] if header else []
    for r in rows:
        checked = "" if r["stop_checks_per_token"] is None else f"{r['stop_checks_per_token']:.1%}"
        stream = str(r["stream"]) if (r.get("stream_interval") or 1) == 1 else f"every {r['stream_interval']}"
        lines.append(f"{r['seqs']:>5} {r['context']:>7} {str(r['stop']):>5} {stream:>6} {r['vocab']:>6} "
                     f"{r['ms_per_step']:>8.3f} {r['ms_per_step_mean']:>7.3f} {r['ms_per_step_min']:>7.3f} {checked:>7}")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """Each context's figure over the smallest context's, per (seqs, stop, stream), taken side by
    side (`bench_overhead`: the median over rounds of the two round medians' ratio)."""
    base = {}
    out = []
    for r in rows:
        key = (r["seqs"], r["stop"], r["stream"])
        base.setdefault(key, r)
        b = base[key]
        if b is not r:
            out.append(f"seqs {r['seqs']:>3} stop={r['stop']!s:<5} stream={r['stream']!s:<5} "
                       f"context {r['context']}/{b['context']}: {r['ratio']:.2f}x")
    return "\n".join(out)


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
