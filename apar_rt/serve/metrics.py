"""Prometheus metrics of `apar-rt serve` (`GET /metrics`): apar_rt.serve.metric_names's vocabulary,
rendered with prometheus_client. Each server has its own registry, so several servers (or tests)
can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from apar_rt.serve.metric_names import ServingCounters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServingMetrics(ServingCounters):
    """The serving loop's observer, rendered for Prometheus."""

    def __init__(self, engine=None) -> None:
        super().__init__(medusa=getattr(engine, "verifier", None) is not None)
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, counters: ServingCounters) -> None:
        self.c = counters

    def describe(self):
        return []

    def collect(self):
        values = self.c.values()
        for spec in self.c.specs:
            if spec.kind == "histogram":
                buckets, total = self.c.histogram(spec.name)
                yield HistogramMetricFamily(spec.name, spec.doc, buckets=buckets, sum_value=total)
                continue
            family = GaugeMetricFamily if spec.kind == "gauge" else CounterMetricFamily
            value = values[spec.name]
            if spec.labels:
                fam = family(spec.name, spec.doc, labels=spec.labels)
                for labels, v in sorted(value.items()):
                    fam.add_metric(list(labels), v)
                yield fam
            else:
                yield family(spec.name, spec.doc, value=value)
