"""The Triton model, on a real `tritonserver` process (from the nvidia-pytriton wheel, no docker).

`runtime/launch_tritonserver.sh` downloads and unpacks the server once (about 55 MB, cached
in $APAR_TRITON_HOME, default ~/.cache/apar-rt/tritonserver-2.51) and serves a copy of
runtime/model_repository pointed at a tiny random model. Clients: tritonclient's gRPC
streaming, and HTTP `generate` / `generate_stream`. Set APAR_SKIP_TRITON=1 to skip.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.triton

if os.environ.get("APAR_SKIP_TRITON") == "1":
    pytest.skip("APAR_SKIP_TRITON=1", allow_module_level=True)
if sys.platform != "linux" or platform.machine() != "x86_64":
    pytest.skip("the nvidia-pytriton tritonserver bundle is for Linux x86_64", allow_module_level=True)
httpx = pytest.importorskip("httpx")
grpcclient = pytest.importorskip("tritonclient.grpc")

from apar_rt import LLM, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read", "note step tip plan idea"]
ENGINE_KW = dict(max_num_seqs=512, max_num_tokens=4096, num_blocks=2048)   # see test_openai_server.py
FORK_BIAS = 4.0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Triton:
    def __init__(self, proc, http, grpc, metrics, log):
        self.proc, self.log = proc, log
        self.http_port, self.grpc_port, self.metrics_port = http, grpc, metrics
        self.url = f"http://127.0.0.1:{http}"

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + (labels or " ")) or (not labels and line.startswith(name + "{}")):
                return float(line.split()[-1])
        return 0.0

    def wait_metric(self, name: str, pred, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.metric(name)
            if pred(v) or time.monotonic() > deadline:
                return v
            time.sleep(0.05)


@pytest.fixture(scope="module")
def triton(tiny_gqa, tmp_path_factory):
    work = tmp_path_factory.mktemp("triton")
    http, grpc, metrics = _free_ports(3)
    log = work / "tritonserver.log"
    t0 = time.monotonic()
    setup = subprocess.run(["bash", str(ROOT / "runtime/launch_tritonserver.sh"), "--setup-only"],
                           env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                           timeout=600)
    assert setup.returncode == 0, setup.stderr[-3000:]
    print(f"tritonserver setup: {time.monotonic() - t0:.1f} s {setup.stderr.strip()}")
    params = ["raw=true", "torch_threads=1", "dtype=float32", "device=cpu"] + \
        [f"{k}={v}" for k, v in ENGINE_KW.items()]
    cmd = ["bash", str(ROOT / "runtime/launch_tritonserver.sh"), "--model", str(tiny_gqa[0]),
           "--repo-out", str(work / "repo"), "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics)]
    for p in params:
        cmd += ["--param", p]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHON": sys.executable})
    server = Triton(proc, http, grpc, metrics, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{server.url}/v2/models/apar/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver was not ready in 180 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        print(f"tritonserver ready {time.monotonic() - t0:.1f} s after the test began")
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


@pytest.fixture(scope="module")
def fork(tiny_gqa):
    return tiny_gqa[2].convert_tokens_to_ids("[SplitMask]")


@pytest.fixture(scope="module")
def reference(tiny_gqa, fork):
    """`apar-rt generate --raw` with the same sampling, per prompt."""
    llm = LLM(str(tiny_gqa[0]), dtype="float32", device="cpu", raw=True, **ENGINE_KW)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, logit_bias={fork: FORK_BIAS}))
    return dict(zip(PROMPTS, outs))


def body(prompt, **kw):
    d = {"text_input": prompt, "max_tokens": 40, "temperature": 0.0,
         "embedding_bias_words": ["[SplitMask]"], "embedding_bias_weights": [FORK_BIAS]}
    d.update(kw)
    return d


def generate(triton, payload, status=200):
    r = httpx.post(f"{triton.url}/v2/models/apar/generate", json=payload, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def sse(triton, payload) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{triton.url}/v2/models/apar/generate_stream", json=payload, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def assert_served(triton):
    assert generate(triton, body("one two", max_tokens=3))["text_output"] is not None


def test_http_generate_equals_generate(triton, reference):
    assert sum(o.stats["forks"] for o in reference.values()) >= 3
    for prompt, ref in reference.items():
        out = generate(triton, body(prompt))
        assert out["model_name"] == "apar" and out["text_output"] == ref.text


def test_http_generate_stream_equals_generate(triton, reference):
    for prompt in PROMPTS[:3]:
        events = sse(triton, body(prompt, stream=True))
        assert len(events) > 2 and all("error" not in e for e in events)
        assert "".join(e["text_output"] for e in events) == reference[prompt].text


def _grpc_inputs(prompt, max_tokens=40, stream=True, fork_bias=True, **extra):
    def tensor(name, value, dtype):
        arr = np.array(value, dtype=dtype).reshape(-1)
        t = grpcclient.InferInput(name, list(arr.shape), {np.object_: "BYTES", np.int32: "INT32",
                                                           np.float32: "FP32", np.bool_: "BOOL"}[dtype])
        t.set_data_from_numpy(arr)
        return t

    inputs = [tensor("text_input", [prompt.encode()], np.object_),
              tensor("max_tokens", [max_tokens], np.int32), tensor("stream", [stream], np.bool_)]
    if extra.pop("temperature", 0.0) is not None:
        inputs.append(tensor("temperature", [0.0], np.float32))
    if fork_bias:
        inputs += [tensor("embedding_bias_words", [b"[SplitMask]"], np.object_),
                   tensor("embedding_bias_weights", [FORK_BIAS], np.float32)]
    for name, (value, dtype) in extra.items():
        inputs.append(tensor(name, [value], dtype))
    return inputs


def _fp32(name, value):
    t = grpcclient.InferInput(name, [1], "FP32")
    with np.errstate(over="ignore"):     # 1e39 is inf in FP32: that is the point
        t.set_data_from_numpy(np.array([value], dtype=np.float32))
    return t


class GrpcStream:
    """tritonclient gRPC bidirectional stream; results gathered per request id."""

    def __init__(self, triton):
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.grpc_port}")
        self.q: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)))

    def send(self, rid, inputs):
        self.client.async_stream_infer("apar", inputs, request_id=rid, enable_empty_final_response=True)

    def collect(self, n_requests, timeout=60):
        texts, errors, done = {}, {}, set()
        deadline = time.monotonic() + timeout
        while len(done) < n_requests:
            result, error = self.q.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                errors[len(errors)] = str(error)
                done.add(f"error-{len(errors)}")
                continue
            resp = result.get_response()
            out = result.as_numpy("text_output")
            if out is not None:
                texts[resp.id] = texts.get(resp.id, "") + b"".join(out.reshape(-1)).decode()
            if resp.parameters["triton_final_response"].bool_param:
                done.add(resp.id)
        return texts, errors

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def test_grpc_streaming_equals_generate(triton, reference):
    s = GrpcStream(triton)
    try:
        for i, prompt in enumerate(PROMPTS):   # all in flight together
            s.send(str(i), _grpc_inputs(prompt))
        texts, errors = s.collect(len(PROMPTS))
    finally:
        s.close()
    assert not errors
    assert texts == {str(i): reference[p].text for i, p in enumerate(PROMPTS)}
    assert triton.wait_metric("apar_kv_blocks_used", lambda v: v == 0) == 0


def test_cancelled_grpc_stream_frees_its_blocks(triton):
    aborted = triton.metric("apar_requests_finished", '{finish_reason="abort"}')
    s = GrpcStream(triton)
    try:
        # one thread of 480 tokens (EOS ignored) runs for a second or more
        s.send("long", _grpc_inputs(PROMPTS[2], max_tokens=480, fork_bias=False, end_id=(-1, np.int32)))
        first, error = s.q.get(timeout=30)
        assert error is None and first.as_numpy("text_output") is not None
        assert triton.wait_metric("apar_kv_blocks_used", lambda v: v > 0) > 0
    finally:
        s.close(cancel=True)
    assert triton.wait_metric("apar_kv_blocks_used", lambda v: v == 0) == 0
    deadline = time.monotonic() + 15
    while triton.metric("apar_requests_finished", '{finish_reason="abort"}') < aborted + 1:
        assert time.monotonic() < deadline, "the cancelled request was not aborted"
        time.sleep(0.1)
    assert_served(triton)


def test_http_client_disconnecting_mid_stream(triton):
    aborted = triton.metric("apar_requests_finished", '{finish_reason="abort"}')
    with httpx.stream("POST", f"{triton.url}/v2/models/apar/generate_stream", timeout=30,
                      json={"text_input": PROMPTS[1], "max_tokens": 480, "end_id": -1, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
    assert_served(triton)
    assert triton.wait_metric("apar_kv_blocks_used", lambda v: v == 0, timeout=30) == 0
    deadline = time.monotonic() + 15     # Triton cancels the request; the model aborts it
    while triton.metric("apar_requests_finished", '{finish_reason="abort"}') < aborted + 1:
        assert time.monotonic() < deadline, "the disconnected request was not aborted"
        time.sleep(0.1)


@pytest.mark.parametrize("payload,status,message", [
    # Triton's HTTP front end answers JSON it cannot parse or convert with 500 (its choice)
    (b"{not json", 500, "parse"),
    (b'{"text_input": "x", "max_tokens": "many"}', 500, "parse"),
    (b'{"text_input": "x", "frobnicate": 1}', 400, "frobnicate"),
    (b'{"max_tokens": 4}', 400, "text_input"),
    (b'{"text_input": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"text_input": "x", "temperature": -1.0}', 400, "temperature"),
    (b'{"text_input": "x", "top_p": 1.5}', 400, "top_p"),
    (b'{"text_input": "x", "mode": "fast"}', 400, "mode"),
    (b'{"text_input": "x", "medusa": true}', 400, "Medusa"),
    (b'{"text_input": "x", "end_id": -7}', 400, "end_id"),
    (('{"text_input": "' + "one two " * 400 + '", "max_tokens": 4}').encode(), 400, "context"),
])
def test_http_bad_requests_fail_alone(triton, payload, status, message):
    r = httpx.post(f"{triton.url}/v2/models/apar/generate", content=payload, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert_served(triton)


def test_unknown_model_and_decoupled_infer(triton):
    r = httpx.post(f"{triton.url}/v2/models/nope/generate", json={"text_input": "x"}, timeout=30)
    assert r.status_code in (400, 404) and "unknown model" in r.json()["error"]
    assert_served(triton)


def test_grpc_bad_request_fails_alone(triton, reference):
    s = GrpcStream(triton)
    try:
        s.send("bad", _grpc_inputs(PROMPTS[0], max_tokens=-5))
        s.send("good", _grpc_inputs(PROMPTS[0]))
        texts, errors = s.collect(2)
    finally:
        s.close()
    assert len(errors) == 1 and "max_tokens" in next(iter(errors.values()))
    assert texts["good"] == reference[PROMPTS[0]].text


def test_poisoned_values_fail_alone_while_four_streams_finish(triton, reference):
    """Tiny temperatures are greedy; 1e39 (inf in FP32), NaN and 2^31 are refused; 4 streams
    in flight meanwhile finish with their normal text."""
    s = GrpcStream(triton)
    try:
        for i, prompt in enumerate(PROMPTS[:4]):
            s.send(f"v{i}", _grpc_inputs(prompt))
        s.send("tiny", _grpc_inputs(PROMPTS[0], temperature=None) + [_fp32("temperature", 1e-40)])
        s.send("inf", _grpc_inputs(PROMPTS[0], temperature=None) + [_fp32("temperature", 1e39)])
        s.send("nan", _grpc_inputs(PROMPTS[0], temperature=None) + [_fp32("top_p", float("nan"))])
        texts, errors = s.collect(7)
    finally:
        s.close()
    assert {k: texts[k] for k in ("v0", "v1", "v2", "v3")} == {f"v{i}": reference[p].text
                                                               for i, p in enumerate(PROMPTS[:4])}
    assert texts["tiny"] == reference[PROMPTS[0]].text            # greedy
    assert len(errors) == 2 and all("finite" in e for e in errors.values()), errors
    r = httpx.post(f"{triton.url}/v2/models/apar/generate", json=body("x", max_tokens=2 ** 31), timeout=30)
    assert r.status_code == 400 and "wraps negative" in r.json()["error"]
    assert triton.wait_metric("apar_kv_blocks_used", lambda v: v == 0) == 0


def test_genai_perf_optional_inputs(triton, reference):
    """tensorrtllm_backend's optional inputs that genai-perf sends are accepted; unsupported
    values are answered as such."""
    ref = reference[PROMPTS[0]].text
    out = generate(triton, body(PROMPTS[0], exclude_input_in_output=True, return_log_probs=False,
                                beam_width=1, min_length=0, pad_id=2))
    assert out["text_output"] == ref
    assert generate(triton, body(PROMPTS[0], exclude_input_in_output=False))["text_output"] == PROMPTS[0] + ref
    for field, value in (("return_log_probs", True), ("beam_width", 4), ("min_length", 16),
                         ("return_generation_logits", True)):
        r = httpx.post(f"{triton.url}/v2/models/apar/generate", json=body("x", **{field: value}), timeout=30)
        assert r.status_code == 400 and f"{field}=" in r.json()["error"] and "not supported" in r.json()["error"]
    assert_served(triton)
