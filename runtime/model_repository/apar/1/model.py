"""Triton Python-backend model over the apar-rt engine (decoupled: responses stream).

A thin shell: request parsing, batching and streaming live in apar_rt.serve.triton_adapter
(one EngineLoop for every request). This file turns Triton requests into input dicts,
wraps each response sender, and exports apar-rt's metrics (the names `apar-rt serve` uses) as
Triton custom metrics.
"""

import json
import os
import sys
import threading

# tritonserver's working directory may hold a folder named like a package we import (say
# `triton`, the kernel language): drop the current directory from the import path first.
sys.path[:] = [p for p in sys.path if p not in ("", ".")
               and (os.path.abspath(p) != os.getcwd() or os.path.isdir(os.path.join(p, "apar_rt")))]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from apar_rt.serve.triton_adapter import TritonServing, model_parameters  # noqa: E402

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error(message, code_name):
    code = getattr(pb_utils.TritonError, code_name, None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


class _Sender:
    """The adapter's Sender over one request's response sender."""

    def __init__(self, request):
        self._sender = request.get_response_sender()
        self._done = False

    def send(self, text, final):
        out = pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
        self._finish_with(pb_utils.InferenceResponse(output_tensors=[out]), final)

    def error(self, message, internal=False):
        err = _error(message, "INTERNAL" if internal else "INVALID_ARG")
        self._finish_with(pb_utils.InferenceResponse(error=err), True)

    def cancelled(self):
        return self._sender.is_cancelled()

    def close(self):
        if not self._done:
            self._done = True
            self._sender.send(flags=_FINAL)

    def _finish_with(self, response, final):
        if self._done:
            return
        self._done = final
        self._sender.send(response, flags=_FINAL if final else 0)


class _Metrics:
    """apar-rt's metrics vocabulary (apar_rt.serve.metric_names, the same names `apar-rt serve`
    exports) as Triton custom metrics, on Triton's /metrics. Histograms observe as requests run;
    gauges and counters are pushed from the engine's counters every `period` seconds."""

    def __init__(self, period=0.2):
        from apar_rt.serve.metric_names import LATENCY_BUCKETS, METRICS

        fam = pb_utils.MetricFamily
        self._kinds = {"gauge": fam.GAUGE, "counter": fam.COUNTER, "histogram": fam.HISTOGRAM}
        self._families = {}     # a MetricFamily must outlive its Metrics
        self._hist = {}
        for spec in METRICS:
            if spec.kind == "histogram":
                family = fam(name=spec.name, description=spec.doc, kind=fam.HISTOGRAM)
                self._families[spec.name] = family
                self._hist[spec.name] = family.Metric(labels={}, buckets=list(LATENCY_BUCKETS))
        self._metrics = {}      # (name, label values) -> [Metric, value pushed so far]
        self._period = period
        self._serving = None
        self._stop = threading.Event()
        self._thread = None

    def observe(self, name, seconds):
        self._hist[name].observe(seconds)

    def start(self, serving):
        self._serving = serving
        for spec in serving.counts.specs:
            if spec.kind != "histogram":
                self._families[spec.name] = pb_utils.MetricFamily(name=spec.name, description=spec.doc,
                                                                  kind=self._kinds[spec.kind])
        self.push()
        self._thread = threading.Thread(target=self._run, daemon=True, name="apar-metrics")
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._period):
            self.push()

    def push(self):
        values = self._serving.counts.values()
        for spec in self._serving.counts.specs:
            if spec.kind == "histogram":
                continue
            value = values[spec.name]
            for labels, v in (value.items() if spec.labels else [((), value)]):
                key = (spec.name, labels)
                if key not in self._metrics:
                    metric = self._families[spec.name].Metric(labels=dict(zip(spec.labels, labels)))
                    self._metrics[key] = [metric, 0]
                entry = self._metrics[key]
                if spec.kind == "gauge":
                    entry[0].set(float(v))
                elif v > entry[1]:
                    entry[0].increment(float(v - entry[1]))
                    entry[1] = v

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the apar model must be decoupled "
                                                "(model_transaction_policy { decoupled: true })")
        self.metrics = _Metrics()
        self.serving = TritonServing.from_parameters(model_parameters(config), args["model_repository"],
                                                     on_latency=self.metrics.observe)
        self.metrics.start(self.serving)

    def execute(self, requests):
        for request in requests:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            self.serving.submit(inputs, _Sender(request), json.loads(request.parameters() or "{}"))
        return None

    def finalize(self):
        self.metrics.close()
        self.serving.close()
