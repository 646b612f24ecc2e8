"""Prometheus metrics of the serving loop (`GET /metrics`).

Histograms are observed in the engine's thread as events happen; gauges and counters that
mirror the engine (requests running/waiting, KV blocks, forks) are read from the loop's
latest `LoopStats` at scrape time. Each server has its own registry, so several servers (or
tests) can live in one process.

| metric | kind | meaning |
|---|---|---|
| apar_rt_time_to_first_token_seconds | histogram | arrival to the step that generated the first token |
| apar_rt_inter_token_latency_seconds | histogram | between a request's successive token-producing steps (*) |
| apar_rt_e2e_request_latency_seconds | histogram | arrival to the end of a request |
| apar_rt_requests_running / _waiting | gauge | requests being decoded / queued |
| apar_rt_kv_blocks_used / _total | gauge | KV cache blocks in use / usable |
| apar_rt_forks_total | counter | APAR forks (child branches started) |
| apar_rt_requests_finished_total{finish_reason} | counter | finished requests by reason |
| apar_rt_prompt_tokens_total / apar_rt_generation_tokens_total | counter | tokens in / out |
| apar_rt_engine_steps_total, apar_rt_preemptions_total | counter | engine steps, preemptions |
| apar_rt_medusa_accepted_tokens_per_step | gauge | Medusa: mean tokens accepted per thread step (**) |
| apar_rt_medusa_thread_steps_total / _accepted_tokens_total | counter | the sums behind that mean |

(*) an APAR step may add several tokens to a request, one per live branch (Medusa: more).
(**) over finished requests; NaN while the engine runs no Medusa heads (or none finished yet).
"""

from __future__ import annotations

import math
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from apar_rt.serve.engine_loop import LoopStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """A `LoopObserver` that exports Prometheus metrics."""

    def __init__(self, engine=None) -> None:
        self.registry = CollectorRegistry()
        self._engine = engine
        self.stats = LoopStats()
        self._lock = threading.Lock()
        self._medusa_steps = 0
        self._medusa_accepted = 0
        r = self.registry
        self.ttft = Histogram("apar_rt_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("apar_rt_inter_token_latency_seconds",
                             "Time between successive token-producing steps of a request.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("apar_rt_e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("apar_rt_requests_finished", "Finished requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("apar_rt_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.generation_tokens = Counter("apar_rt_generation_tokens",
                                         "Generated tokens of finished requests (all branches).", registry=r)
        self.medusa_steps = Counter("apar_rt_medusa_thread_steps",
                                    "Medusa verification steps of threads (finished requests).", registry=r)
        self.medusa_accepted = Counter("apar_rt_medusa_accepted_tokens",
                                       "Tokens accepted in Medusa verification steps (finished requests).",
                                       registry=r)
        r.register(_EngineCollector(self))

    # LoopObserver
    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finish(self, seconds: float, reason: str, prompt_tokens: int, generated_tokens: int,
                  stats: dict | None = None) -> None:
        self.e2e.observe(seconds)
        self.finished.labels(finish_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        hist = (stats or {}).get("accepted_length_histogram") or {}
        with self._lock:
            for k, v in hist.items():
                self._medusa_steps += v
                self._medusa_accepted += int(k) * v
        self.medusa_steps.inc(sum(hist.values()))
        self.medusa_accepted.inc(sum(int(k) * v for k, v in hist.items()))

    def on_stats(self, stats: LoopStats) -> None:
        self.stats = stats

    def medusa_acceptance(self) -> float:
        """Mean tokens accepted per thread verification step; NaN without Medusa (or no data yet)."""
        with self._lock:
            steps, accepted = self._medusa_steps, self._medusa_accepted
        if getattr(self._engine, "verifier", None) is None or not steps:
            return math.nan
        return accepted / steps

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from the loop's latest snapshot at scrape time."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        s = self.m.stats
        for name, doc, value in (("apar_rt_requests_running", "Requests being decoded.", s.running),
                                 ("apar_rt_requests_waiting", "Requests queued for admission.", s.waiting),
                                 ("apar_rt_kv_blocks_used", "KV cache blocks in use.", s.kv_blocks_used),
                                 ("apar_rt_kv_blocks_total", "Usable KV cache blocks.", s.kv_blocks_total),
                                 ("apar_rt_medusa_accepted_tokens_per_step",
                                  "Medusa: mean tokens accepted per thread step (NaN: no Medusa).",
                                  self.m.medusa_acceptance())):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (("apar_rt_forks", "APAR forks (child branches started).", s.forks),
                                 ("apar_rt_engine_steps", "Engine steps.", s.steps),
                                 ("apar_rt_preemptions", "Requests preempted for lack of KV blocks.",
                                  s.preemptions)):
            yield CounterMetricFamily(name, doc, value=value)
