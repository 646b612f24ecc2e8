"""`apar-rt serve` against hostile and unusual clients: a poisoned request fails alone, huge
requests do not stall other streams, hostile JSON is a 400/413 with no internal detail, real
load tools' extensions are accepted, and --api-key guards every /v1 route.

Real uvicorn servers on 127.0.0.1 (free ports) over a tiny random model.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from apar_rt import LLM, SamplingParams  # noqa: E402
from apar_rt.testing.serving import wait_until_idle

MODEL = "tiny"
ENGINE_KW = dict(max_num_seqs=512, max_num_tokens=4096, num_blocks=2048)
VICTIMS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip"]


@pytest.fixture(scope="module")
def server(tiny_gqa):
    from apar_rt.engine import Engine
    from apar_rt.serve.openai_server import OpenAIServer

    engine = Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu", **ENGINE_KW)
    srv = OpenAIServer(engine, MODEL, port=0, max_body_bytes=16 << 20).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fork_id(tiny_gqa):
    return tiny_gqa[2].convert_tokens_to_ids("[SplitMask]")


@pytest.fixture(scope="module")
def reference(tiny_gqa, fork_id):
    """What each victim stream must say: `apar-rt generate --raw` alone."""
    llm = LLM(str(tiny_gqa[0]), dtype="float32", device="cpu", raw=True, **ENGINE_KW)
    outs = llm.generate(VICTIMS, SamplingParams(max_tokens=48, ignore_eos=True, logit_bias={fork_id: 4.0}))
    return [o.text for o in outs]


def post(server, path, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json"},
                      timeout=120, **kw)


def completion(prompt, **kw):
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}


def stream_victim(server, prompt, fork_id, started: threading.Event | None = None):
    """One streamed completion; (text, arrival time of each chunk with text)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(fork_id): 4.0}, "stream": True}
    text, times = "", []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            piece = ev["choices"][0]["text"]
            if piece:
                text += piece
                times.append(time.monotonic())
                if started is not None:
                    started.set()
    return text, times


def assert_served(server):
    r = post(server, "/v1/completions", completion("one two"))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def poisoned(**fields) -> SamplingParams:
    p = SamplingParams(max_tokens=40, temperature=0.8, seed=3)
    for k, v in fields.items():
        object.__setattr__(p, k, v)     # values validation refuses: an engineered in-step failure
    return p


def test_poisoned_requests_fail_alone_while_four_streams_finish(server, reference, fork_id):
    started = [threading.Event() for _ in VICTIMS]
    with ThreadPoolExecutor(len(VICTIMS)) as pool:
        victims = [pool.submit(stream_victim, server, p, fork_id, ev) for p, ev in zip(VICTIMS, started)]
        assert all(ev.wait(60) for ev in started)          # every victim is mid-stream
        # engineered failures inside the engine step, beside the victims
        bad = [server.loop.add("x y", poisoned(logit_bias=((5, float("nan")),)), raw=True),
               server.loop.add("x y", poisoned(temperature=0.0, logit_bias=((5, float("nan")),)), raw=True),
               server.loop.add("x y", poisoned(logit_bias=((5, "x"),)), raw=True)]   # raises in the sampler
        # what a client can send: tiny temperatures are greedy, non-finite ones are refused
        tiny = post(server, "/v1/completions", completion("one two", temperature=1e-300, seed=1))
        nan = post(server, "/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}')
        inf = post(server, "/v1/completions", b'{"model": "tiny", "prompt": "x", "top_p": 1e999}')
        huge = post(server, "/v1/completions", completion("x", max_tokens=2 ** 31))
        got = [v.result(timeout=120)[0] for v in victims]
    assert got == reference
    finals = [list(s)[-1] for s in bad]
    assert all(f.finish_reason == "error" for f in finals)
    assert "not finite" in finals[0].error and "not finite" in finals[1].error
    assert finals[2].error.startswith("internal error while sampling") and "convert" not in finals[2].error
    assert tiny.status_code == 200
    assert tiny.json()["choices"][0]["text"] == post(server, "/v1/completions",
                                                     completion("one two")).json()["choices"][0]["text"]
    for r, param in ((nan, None), (inf, "top_p"), (huge, "max_tokens")):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    assert wait_until_idle(server.loop)


def test_huge_requests_do_not_stall_a_running_stream(server, reference, fork_id):
    """A 10 MB prompt, a million prompt token ids and a 100k-message chat are refused while a
    stream runs; the stream's longest pause stays within a few steps (tokenizing never runs on
    the engine thread)."""
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        victim = pool.submit(stream_victim, server, VICTIMS[0], fork_id, started)
        assert started.wait(60)
        t0 = time.monotonic()
        big = post(server, "/v1/completions", completion("one two " * (10 << 20 >> 3)))
        ids = post(server, "/v1/completions", completion([5] * 1_000_000))
        chat = post(server, "/v1/chat/completions",
                    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 100_000})
        t1 = time.monotonic()
        text, times = victim.result(timeout=120)
    assert text == reference[0]
    for r in (big, ids, chat):
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    gaps = [b - a for a, b in zip(times, times[1:])]
    during = [b - a for a, b in zip(times, times[1:]) if b > t0 and a < t1]
    # Before tokenizing left the engine thread, the 10 MB prompt alone froze the other streams
    # for ~13 s; a pause of a few steps is what remains (the event loop parses the JSON bodies).
    assert max(during or [0.0]) < max(1.5, 30 * statistics.median(gaps)), (during, statistics.median(gaps))


@pytest.mark.parametrize("body,status,param", [
    (b"[" * 100_000 + b"]" * 100_000, 400, None),                                   # deep nesting
    (b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),  # 5000 digits
    (b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 4000 + b"}", 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "temperature": ' + b"9" * 4000 + b"}", 400, "temperature"),
    (b'{"model": "tiny", "prompt": "x", "top_p": ' + b"9" * 4000 + b"}", 400, "top_p"),
    (b'{"model": "tiny", "prompt": "x", "seed": ' + b"9" * 4000 + b"}", 400, "seed"),
    (b'{"model": "tiny", "prompt": "\\ud800"}', 400, None),                          # lone surrogate
    (b'{"model": "\\udfff", "prompt": "x"}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', 400, None),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),                         # not UTF-8
    (b'{"model": "tiny", "prompt": "x", "temperature": Infinity}', 400, None),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"05": 1}}', 400, "logit_bias"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {" 12 ": 1}}', 400, "logit_bias"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"1_000": 1}}', 400, "logit_bias"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"\xd9\xa1": 1}}', 400, "logit_bias"),  # Arabic 1
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"5": NaN}}', 400, None),
    (json.dumps(completion("x", logit_bias={str(i): 1 for i in range(301)})).encode(), 400, "logit_bias"),
    (json.dumps(completion("x", stream=True, stream_options={"include_usage": "yes"})).encode(), 400,
     "stream_options"),
])
def test_hostile_json_is_a_400_without_internal_detail(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param
    for leak in ("Error(", "Traceback", "RecursionError", "UnicodeEncodeError", "set_int_max_str_digits"):
        assert leak not in err["message"]
    assert_served(server)


def test_body_limit_is_a_413_before_reading(server):
    limit = 16 << 20
    # Content-Length says too much: refused before a byte of the body is read (none is sent)
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {limit + 1}\r\n\r\n".encode())
        reply = b""
        while b"}}" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply
    err = json.loads(payload)["error"]
    assert err["code"] == "request_too_large" and str(limit) in err["message"]

    def chunks():                     # no Content-Length: cut off once past the limit
        for _ in range(20):
            yield b" " * (1 << 20)
    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413
    assert_served(server)


def test_load_tool_stream_options_and_extensions(server, fork_id):
    """guidellm's continuous_usage_stats (usage in every chunk, as vLLM), OpenAI's
    include_obfuscation, and harmless fields real clients send."""
    body = {"model": MODEL, "prompt": VICTIMS[0], "max_tokens": 24, "temperature": 0, "stream": True,
            "logit_bias": {str(fork_id): 4.0}, "store": False, "metadata": {"run": "bench"},
            "stream_options": {"include_usage": True, "continuous_usage_stats": True,
                               "include_obfuscation": False}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(events) >= 3 and all("usage" in ev for ev in events)
    done = [ev["usage"]["completion_tokens"] for ev in events]
    assert done == sorted(done) and done[-1] == 24           # cumulative, up to the whole answer
    assert events[-1]["choices"] == [] and events[0]["usage"]["prompt_tokens"] > 0
    plain = post(server, "/v1/chat/completions",
                 {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                  "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in plain.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert [("usage" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]


@pytest.fixture(scope="module")
def keyed(tiny_gqa):
    from apar_rt.engine import Engine
    from apar_rt.serve.openai_server import OpenAIServer

    engine = Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu")
    srv = OpenAIServer(engine, MODEL, port=0, api_key="s3cret", protect_metrics=True).start()
    yield srv
    srv.stop()


def test_api_key_guards_every_v1_route_and_metrics(keyed):
    u = keyed.url
    good = {"authorization": "Bearer s3cret"}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                    {"authorization": "Basic s3cret"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("GET", "/metrics"), ("POST", "/v1/nothing")):
            r = httpx.request(method, u + path, json=completion("x"), headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(u + "/health").status_code == 200          # liveness stays open
    assert httpx.get(u + "/v1/models", headers=good).status_code == 200
    assert httpx.get(u + "/metrics", headers=good).status_code == 200
    r = httpx.post(u + "/v1/completions", json=completion("one two"), headers=good, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    import openai

    client = openai.OpenAI(base_url=u + "/v1", api_key="s3cret", max_retries=0, timeout=60)
    assert client.completions.create(model=MODEL, prompt="one", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=u + "/v1", api_key="nope", max_retries=0).models.list()


def test_serve_api_key_flags(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from apar_rt.cli import main

    r = CliRunner().invoke(main, ["serve", "--help"])
    assert "--api-key" in r.output and "APAR_RT_API_KEY" in r.output and "--max-body-bytes" in r.output
    r = CliRunner().invoke(main, ["serve", "--model", str(tmp_path), "--protect-metrics"])
    assert r.exit_code != 0
