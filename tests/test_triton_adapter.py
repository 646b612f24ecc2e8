"""The Triton model's request handling (`TritonServing`) in process, over a real engine: a
dead engine loop is answered at once, a failed send cancels its request and frees its KV
blocks, and one relay thread serves every request.

The `Sender` here stands in for Triton's response sender (the model shell's wrapper); the
engine, its loop and the relay are the real ones.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from apar_rt.serve.triton_adapter import TritonServing
from apar_rt.testing.serving import wait_until_idle


class Recorder:
    """A Sender that records what it is asked to send; `fail_after` sends then raise."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[str, bool]] = []
        self.errors: list[tuple[str, bool]] = []
        self.closed = False
        self.done = threading.Event()
        self.fail_after = fail_after

    def send(self, text: str, final: bool) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("the client went away")
        self.sent.append((text, final))
        if final:
            self.done.set()

    def error(self, message: str, internal: bool = False) -> None:
        self.errors.append((message, internal))
        self.done.set()

    def cancelled(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.done.set()


def inputs(prompt: str, max_tokens: int = 16, stream: bool = True, **extra) -> dict:
    d = {"text_input": np.array([prompt.encode()], dtype=np.object_),
         "max_tokens": np.array([max_tokens], dtype=np.int32), "stream": np.array([stream]),
         "raw": np.array([True])}
    d.update(extra)
    return d


@pytest.fixture
def serving(tiny_gqa):
    from apar_rt.engine import Engine

    engine = Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu")
    s = TritonServing(engine, poll_seconds=0.02)
    yield s
    s.close()


def test_a_failed_send_cancels_the_request_and_frees_its_blocks(serving):
    bad = Recorder(fail_after=1)            # the client goes away after its first piece
    good = Recorder()
    serving.submit(inputs("one two three", max_tokens=400, end_id=np.array([-1], dtype=np.int32)), bad)
    serving.submit(inputs("first tip", max_tokens=24), good)
    assert good.done.wait(60) and not good.errors
    assert "".join(t for t, _ in good.sent)
    assert wait_until_idle(serving.loop), serving.loop.stats   # KV blocks back to 0 long before 400 tokens
    assert serving.counts.finished("abort") == 1 and len(bad.sent) == 1
    assert serving.engine.num_steps < 200


def test_a_dead_loop_is_answered_at_once(serving):
    long = Recorder()
    serving.submit(inputs("one two three", max_tokens=400, end_id=np.array([-1], dtype=np.int32)), long)
    deadline = time.monotonic() + 30
    while not long.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert long.sent, "the request did not start"

    def die(engine):
        raise SystemExit("the engine thread dies")    # a BaseException: the loop itself stops
    with pytest.raises(RuntimeError):
        serving.loop.call(die)
    assert long.done.wait(10)
    assert long.errors and long.errors[0][1] is True          # internal, answered
    later = Recorder()
    serving.submit(inputs("first tip"), later)                # answered before submit returns
    assert later.errors and later.errors[0] == ("the engine loop stopped after an internal error "
                                                "(SystemExit)", True)
    with pytest.raises(RuntimeError, match="stopped after an internal error"):
        serving.loop.submit("x")                              # never hangs its caller
    with pytest.raises(RuntimeError, match="stopped after an internal error"):
        serving.loop.call(lambda e: None, timeout=None)


def test_one_relay_thread_for_many_requests(serving):
    before = threading.active_count()
    recs = [Recorder() for _ in range(12)]
    for i, r in enumerate(recs):
        serving.submit(inputs(f"one two {i}", max_tokens=12, stream=bool(i % 2)), r)
    during = threading.active_count()
    assert all(r.done.wait(60) for r in recs)
    assert all(not r.errors and r.sent[-1][1] for r in recs)
    assert during - before <= 1        # at most a tokenizer worker; no thread per request
    assert [len(r.sent) for r in recs[::2]] == [1] * 6        # stream false: exactly one response


def test_commands_after_shutdown_raise_at_once(tiny_gqa):
    from apar_rt.engine import Engine
    from apar_rt.serve.engine_loop import EngineLoop

    loop = EngineLoop(Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu")).start()
    loop.close()
    for call in (lambda: loop.submit("x"), lambda: loop.call(lambda e: 1, timeout=None)):
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="shutting down"):
            call()
        assert time.monotonic() - t0 < 5


def test_stream_interval_parameter(tiny_gqa):
    """config.pbtxt's stream_interval reaches the loop: the same streamed text in fewer responses
    than with 1; below 1 the model's load fails naming the parameter."""
    from apar_rt.engine import Engine
    from apar_rt.serve.triton_adapter import model_parameters

    params = model_parameters({"parameters": {"engine_dir": {"string_value": str(tiny_gqa[0])},
                                              "stream_interval": {"string_value": "0"}}})
    with pytest.raises(ValueError, match="stream_interval must be at least 1"):
        TritonServing.from_parameters(params)
    sent = {}
    for interval in (1, 4):
        s = TritonServing(Engine.from_pretrained(tiny_gqa[0], dtype="float32", device="cpu"), poll_seconds=0.02,
                          stream_interval=interval)
        try:
            rec = Recorder()
            s.submit(inputs("one two three", max_tokens=40, end_id=np.array([-1], dtype=np.int32)), rec)
            assert rec.done.wait(60) and not rec.errors
            sent[interval] = rec.sent
        finally:
            s.close()
    assert "".join(t for t, _ in sent[4]) == "".join(t for t, _ in sent[1]) != ""
    assert len(sent[4]) < len(sent[1]) // 2
