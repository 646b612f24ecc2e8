"""Triton Python-backend model over the apar-rt engine (decoupled: responses stream).

A thin shell: request parsing, batching and streaming live in apar_rt.serve.triton_adapter
(one EngineLoop for every request). This file turns Triton requests into input dicts,
wraps each response sender, and exports a few engine gauges as Triton custom metrics.
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
    """Engine gauges and finish counters as Triton custom metrics (on Triton's /metrics)."""

    def __init__(self, serving, period=0.2):
        fam = pb_utils.MetricFamily
        self._serving = serving
        self._families = []     # a MetricFamily must outlive its Metrics
        self._gauges = {}
        for name, doc in (("kv_blocks_used", "KV cache blocks in use"),
                          ("kv_blocks_total", "Usable KV cache blocks"),
                          ("requests_running", "Requests being decoded"),
                          ("requests_waiting", "Requests queued for admission"),
                          ("forks", "APAR forks since start")):
            family = fam(name=f"apar_{name}", description=doc, kind=fam.GAUGE)
            self._families.append(family)
            self._gauges[name] = family.Metric(labels={})
        self._finished = fam(name="apar_requests_finished", description="Finished requests by reason",
                             kind=fam.GAUGE)
        self._families.append(self._finished)
        self._by_reason = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True, name="apar-metrics")
        self._thread.start()

    def _run(self, period):
        while not self._stop.wait(period):
            self.push()

    def push(self):
        s = self._serving.loop.stats
        for name, value in (("kv_blocks_used", s.kv_blocks_used), ("kv_blocks_total", s.kv_blocks_total),
                            ("requests_running", s.running), ("requests_waiting", s.waiting),
                            ("forks", s.forks)):
            self._gauges[name].set(value)
        for reason, n in list(self._serving.counts.finished.items()):
            if reason not in self._by_reason:
                self._by_reason[reason] = self._finished.Metric(labels={"finish_reason": reason})
            self._by_reason[reason].set(n)

    def close(self):
        self._stop.set()
        self._thread.join(2)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the apar model must be decoupled "
                                                "(model_transaction_policy { decoupled: true })")
        self.serving = TritonServing.from_parameters(model_parameters(config), args["model_repository"])
        self.metrics = _Metrics(self.serving)

    def execute(self, requests):
        for request in requests:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            self.serving.submit(inputs, _Sender(request), json.loads(request.parameters() or "{}"))
        return None

    def finalize(self):
        self.metrics.close()
        self.serving.close()
