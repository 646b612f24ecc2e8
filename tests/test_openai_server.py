"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP.

A real uvicorn server on 127.0.0.1 (a free port) over a tiny random model. A logit bias on
[Fork] makes the random model fork, so the streams below interleave APAR branches.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from apar_rt import LLM, SamplingParams  # noqa: E402
from apar_rt.testing.serving import wait_until_idle

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read", "note step tip plan idea"]
MODEL = "tiny"
# Room for every live branch of every request in each step. With a shared max_tokens budget,
# which branch gets the last tokens depends on how branches are scheduled; when all run every
# step, a request's output no longer depends on what else is in flight, so the server (requests
# arriving at any time) and `apar-rt generate` (all at once) must agree exactly.
ENGINE_KW = dict(max_num_seqs=512, max_num_tokens=4096, num_blocks=2048)


@pytest.fixture(scope="module")
def fork_id(tiny_gqa):
    return tiny_gqa[2].convert_tokens_to_ids("[SplitMask]")


@pytest.fixture(scope="module")
def server(tiny_gqa):
    from apar_rt.engine import Engine
    from apar_rt.serve.openai_server import OpenAIServer

    path = tiny_gqa[0]
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", **ENGINE_KW)
    srv = OpenAIServer(engine, [MODEL, "alias"], port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref_raw(tiny_gqa):
    """`apar-rt generate --raw` (completions take the prompt as it is)."""
    return LLM(str(tiny_gqa[0]), dtype="float32", device="cpu", raw=True, **ENGINE_KW)


@pytest.fixture(scope="module")
def ref_chat(tiny_gqa):
    """`apar-rt generate` (chat applies the same template)."""
    return LLM(str(tiny_gqa[0]), dtype="float32", device="cpu", **ENGINE_KW)


def stream_text(chunks) -> tuple[str, str | None, object]:
    text, finish, usage = "", None, None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += c.text if hasattr(c, "text") else (c.delta.content or "")
            finish = c.finish_reason or finish
    return text, finish, usage


def test_completions_equal_generate_streamed_and_not(server, client, ref_raw, fork_id):
    params = SamplingParams(max_tokens=40, logit_bias={fork_id: 4.0})
    want = ref_raw.generate(PROMPTS, params)
    assert sum(o.stats["forks"] for o in want) >= 3     # the streams below really interleave branches
    for prompt, ref in zip(PROMPTS, want):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, logit_bias={str(fork_id): 4.0})
        r = client.completions.create(**kw)
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason.value
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == ref.stats["generated_tokens"]
        text, finish, usage = stream_text(client.completions.create(**kw, stream=True,
                                                                    stream_options={"include_usage": True}))
        assert text == ref.text and finish == ref.finish_reason.value
        assert usage.completion_tokens == ref.stats["generated_tokens"]
    assert wait_until_idle(server.loop)


def test_chat_equals_generate_with_its_template(client, ref_chat, fork_id):
    params = SamplingParams(max_tokens=30, logit_bias={fork_id: 4.0})
    for prompt, ref in zip(PROMPTS[:3], ref_chat.generate(PROMPTS[:3], params)):
        kw = dict(model="alias", messages=[{"role": "user", "content": prompt}], max_tokens=30, temperature=0,
                  logit_bias={str(fork_id): 4.0})
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
        text, finish, _ = stream_text(client.chat.completions.create(**kw, stream=True))
        assert text == ref.text and finish == ref.finish_reason.value


def test_stop_strings_and_seeded_sampling(client, ref_raw, fork_id):
    base = ref_raw.generate([PROMPTS[1]], SamplingParams(max_tokens=30))[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    params = SamplingParams(max_tokens=30, stop=[stop, "zzzz"], logit_bias={fork_id: 4.0})
    ref = ref_raw.generate([PROMPTS[1]], params)[0]
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop, "zzzz"],
              logit_bias={str(fork_id): 4.0})
    assert client.completions.create(**kw).choices[0].text == ref.text
    assert stream_text(client.completions.create(**kw, stream=True))[0] == ref.text
    sp = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    ref = ref_raw.generate([PROMPTS[2]], sp)[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, temperature=0.9, top_p=0.9,
                                    seed=7, stream=True)
    assert stream_text(got)[0] == ref.text


def test_32_concurrent_streams_complete_and_free_their_blocks(server, client, ref_raw, fork_id):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    want = ref_raw.generate(prompts, SamplingParams(max_tokens=32, logit_bias={fork_id: 4.0}))

    def one(prompt):
        return stream_text(client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                                     logit_bias={str(fork_id): 4.0}, stream=True))[:2]

    peak = []
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        while not all(f.done() for f in futures):
            peak.append(server.loop.stats.running)
            time.sleep(0.005)
        got = [f.result(timeout=120) for f in futures]
    assert [t for t, _ in got] == [o.text for o in want]
    assert all(f in ("stop", "length") for _, f in got)
    assert max(peak) > 1                      # requests really ran together
    assert wait_until_idle(server.loop)
    metrics = httpx.get(server.url + "/metrics").text
    assert "apar_rt_kv_blocks_used 0.0" in metrics and "apar_rt_num_requests_running 0.0" in metrics


def test_per_branch_extension(client, ref_raw, fork_id):
    ref = ref_raw.generate([PROMPTS[0]], SamplingParams(max_tokens=40, logit_bias={fork_id: 4.0}))[0]
    assert len(ref.branches) > 1
    chunks = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                       logit_bias={str(fork_id): 4.0}, stream=True,
                                       extra_body={"apar_branches": True})
    tokens, parents, text = {}, {}, ""
    for ch in chunks:
        text += ch.choices[0].text
        for b in (ch.model_extra or {}).get("apar", {}).get("branches", []):
            tokens.setdefault(b["id"], []).extend(b["token_ids"])
            parents[b["id"]] = (b["parent"], b["fork_index"])
    assert text == ref.text
    # Events carry live ids and every token written; the final tree is that tree cut to the
    # max_tokens budget in reading order and numbered in reading order.
    from apar_rt.apar import branch_schema
    from apar_rt.core import Branch
    live = [Branch(id=i, parent=parents[i][0], fork_index=parents[i][1], depth=0, prefix=[],
                   token_ids=tokens[i]) for i in sorted(tokens)]
    assert branch_schema(live, 40) == ref.branches
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                  logit_bias={str(fork_id): 4.0}, extra_body={"apar_branches": True})
    tree = r.model_extra["apar"]
    assert [b["token_ids"] for b in tree["branches"]] == [b["token_ids"] for b in ref.branches]
    assert tree["stats"]["forks"] == ref.stats["forks"]


def test_models_health_metrics(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert httpx.get(server.url + "/v1/models/alias").json()["id"] == "alias"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = httpx.get(server.url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("apar_rt_time_to_first_token_seconds_bucket", "apar_rt_inter_token_latency_seconds_bucket",
                 "apar_rt_e2e_request_latency_seconds_count", "apar_rt_num_requests_running",
                 "apar_rt_num_requests_waiting", "apar_rt_kv_cache_usage_perc", "apar_rt_kv_blocks_used",
                 "apar_rt_forks_total", "apar_rt_num_live_branches"):
        assert name in m.text, name
    assert "medusa" not in m.text, "Medusa metrics only when the engine runs Medusa heads"


# ---- bad input: OpenAI error bodies, and the next request is served ---------------------

def assert_served(client):
    r = client.completions.create(model=MODEL, prompt="one two", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def openai_error(resp, status, param="?"):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "?":
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "tiny", "prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "model"),
    (b'{"prompt": "x"}', 400, "model"),
    (b'{"model": "tiny"}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": ["a", "b"]}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "tiny", "prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "n": 2}', 400, "n"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"5": 500}}', 400, "logit_bias"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"999999": 1}}', 400, "logit_bias"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"five": 1}}', 400, "logit_bias"),
    (b'{"model": "tiny", "prompt": "x", "stop": [1]}', 400, "stop"),
    (b'{"model": "tiny", "prompt": "x", "stop_token_ids": [-1]}', 400, "stop_token_ids"),
    (b'{"model": "tiny", "prompt": "x", "stop_token_ids": [1099511627776]}', 400, "stop_token_ids"),
    (b'{"model": "tiny", "prompt": "x", "echo": true}', 400, "echo"),
    (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', 400, "stream"),
])
def test_bad_completion_requests(server, client, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    openai_error(r, status, param)
    assert_served(client)


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
])
def test_bad_chat_requests(server, client, body, param):
    openai_error(httpx.post(server.url + "/v1/chat/completions", json=body), 400, param)
    assert_served(client)


def test_too_long_prompt_and_typed_client_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="one two " * 400, max_tokens=4)
    assert "context" in str(e.value) and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one two " * 400}],
                                       stream=True)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       temperature=5)
    openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    openai_error(httpx.get(server.url + "/v1/completions"), 405)
    assert_served(client)
    assert wait_until_idle(server.loop)


def finished_total(server, reason: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'apar_rt_request_success_total{{finished_reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_client_disconnecting_mid_stream_aborts_and_frees_blocks(server, client):
    aborted = finished_total(server, "abort")
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: {") for line in got)
            assert server.loop.stats.kv_blocks_used > 0
        # leaving the block closes the connection mid-stream
    assert wait_until_idle(server.loop)
    assert finished_total(server, "abort") == aborted + 1
    assert_served(client)


def test_client_disconnecting_before_a_plain_answer(server, client):
    aborted = finished_total(server, "abort")
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while server.loop.stats.running == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert wait_until_idle(server.loop)
    assert finished_total(server, "abort") == aborted + 1
    assert_served(client)


# ---- the loop and streamer without HTTP -------------------------------------------------

def test_reading_order_stream_equals_final_text_under_forks_and_stops(tiny_gqa, fork_id):
    from apar_rt.apar import branch_schema
    from apar_rt.core import Branch
    from apar_rt.engine import Engine
    from apar_rt.serve import EngineLoop

    engine = Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu", max_num_seqs=16)
    with EngineLoop(engine) as loop:
        streams = []
        for i, p in enumerate(PROMPTS * 3):
            stop = ["ee", "o t"] if i % 2 else []
            params = SamplingParams(max_tokens=60, stop=stop, logit_bias={fork_id: 3.0 + i % 3})
            streams.append(loop.add(p, params, raw=True, branches=True, timeout=30))
        forks = 0
        for s in streams:
            text, per_branch, links = "", {}, {}
            for ev in s:
                text += ev.text
                for b in ev.branches:
                    per_branch.setdefault(b.id, []).extend(b.token_ids)
                    links[b.id] = (b.parent, b.fork_index)
            assert ev.finished and text == ev.output.text
            # the live tree the events rebuild, cut to max_tokens in reading order, is the final tree
            live = [Branch(id=i, parent=links[i][0], fork_index=links[i][1], depth=0, prefix=[],
                           token_ids=per_branch[i]) for i in sorted(per_branch)]
            assert branch_schema(live, 60) == ev.output.branches
            forks += ev.output.stats["forks"]
        assert forks >= 10
        assert loop.call(lambda e: e.scheduler.pool.num_used) == 0


def test_a_final_only_request_gets_one_event_with_the_whole_text(tiny_gqa, fork_id):
    """A request for a client that does not stream (final_only) gets one event, the last, whose
    text is the final text; the same request streamed beside it gets its text step by step, and
    the two texts are equal."""
    from apar_rt.engine import Engine
    from apar_rt.serve import EngineLoop

    engine = Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu", **ENGINE_KW)
    with EngineLoop(engine) as loop:
        with pytest.raises(ValueError, match="final_only"):
            loop.add("one two", SamplingParams(max_tokens=4), raw=True, branches=True, final_only=True)
        finals, streamed = [], []
        for i, p in enumerate(PROMPTS):
            params = SamplingParams(max_tokens=60, stop=["ee"] if i % 2 else [], logit_bias={fork_id: 3.0})
            finals.append(loop.add(p, params, raw=True, final_only=True, timeout=30))
            streamed.append(loop.add(p, params, raw=True, timeout=30))
        forks = 0
        for f, s in zip(finals, streamed):
            (last,), events = list(f), list(s)
            assert last.finished and last.finish_reason in ("stop", "length")
            assert len(events) > 1 and events[-1].finished
            assert last.text == last.output.text == "".join(ev.text for ev in events) != ""
            assert last.generated_tokens == events[-1].generated_tokens
            forks += last.output.stats["forks"]
        assert forks >= 4
        assert loop.call(lambda e: e.scheduler.pool.num_used) == 0


def test_stream_interval_sends_the_same_text_in_fewer_events(tiny_gqa, fork_id):
    """With stream_interval 4, each streamed request's events carry the same text and tokens as
    with 1, its first text comes as early (the same event), and text goes out at most every
    fourth step after that."""
    from apar_rt.engine import Engine
    from apar_rt.serve import EngineLoop

    runs = {}
    for interval in (1, 4):
        engine = Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu", **ENGINE_KW)
        with EngineLoop(engine, stream_interval=interval) as loop:
            streams = [loop.add(p, SamplingParams(max_tokens=60, stop=["ee"] if i % 2 else [],
                                                  logit_bias={fork_id: 3.0}), raw=True, timeout=30)
                       for i, p in enumerate(PROMPTS)]
            runs[interval] = [list(s) for s in streams]
    with pytest.raises(ValueError, match="stream_interval"):
        EngineLoop(engine, stream_interval=0)

    def first_text(events):
        return next(i for i, ev in enumerate(events) if ev.text)

    for every, fourth in zip(runs[1], runs[4]):
        assert "".join(ev.text for ev in fourth) == "".join(ev.text for ev in every) == fourth[-1].output.text
        assert sum(ev.new_tokens for ev in fourth) == sum(ev.new_tokens for ev in every)
        k = first_text(every)
        assert first_text(fourth) == k and fourth[k].text == every[k].text
        # after a text event, three steps' events are held: only events without text come sooner
        empty = sum(1 for ev in every if not ev.text)
        assert len(fourth) < len(every) and len(fourth) <= (len(every) - empty) // 4 + empty + 2


def test_rejected_and_cancelled_requests_on_the_loop(tiny_gqa):
    from apar_rt.engine import Engine
    from apar_rt.serve import EngineLoop

    engine = Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu")
    with EngineLoop(engine) as loop:
        with pytest.raises(ValueError, match="context"):
            loop.add("one " * 600, SamplingParams(max_tokens=4), raw=True, timeout=30)
        s = loop.add("one two", SamplingParams(max_tokens=400, ignore_eos=True), raw=True, timeout=30)
        first = s.get(timeout=30)
        assert first is not None and not first.finished
        s.cancel()
        events = list(s)
        assert events[-1].finished and events[-1].finish_reason == "abort"
        assert loop.call(lambda e: e.scheduler.pool.num_used) == 0
        ok = loop.add("one two", SamplingParams(max_tokens=3), raw=True, timeout=30)
        assert list(ok)[-1].finish_reason in ("stop", "length")


def test_chat_prompt_ids_match_generate(tiny_gqa):
    from apar_rt.model.tokenizer import encode_prompt, vicuna_v1_1_prompt
    from apar_rt.serve.engine_loop import chat_prompt_ids

    tok = tiny_gqa[2]
    assert chat_prompt_ids(tok, [{"role": "user", "content": "hi there"}]) == encode_prompt(tok, "hi there")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    want = tok("Be brief. USER: a ASSISTANT: b</s>USER: c ASSISTANT:").input_ids
    assert chat_prompt_ids(tok, convo) == list(want)
    assert chat_prompt_ids(tok, convo[:2]) == list(tok(vicuna_v1_1_prompt("a", system="Be brief.")).input_ids)
    with pytest.raises(ValueError, match="user message"):
        chat_prompt_ids(tok, convo[:3])


def test_serve_command_flags(tmp_path):
    from click.testing import CliRunner

    from apar_rt.cli import main

    r = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert r.exit_code != 0 and "exactly one of --model DIR or --engine DIR" in r.output
    r = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "nope"), "--port", "0"])
    assert r.exit_code != 0 and "does not exist" in r.output
