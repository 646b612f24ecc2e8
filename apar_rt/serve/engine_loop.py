"""The engine in one loop thread, shared by every server.

`Engine` is not thread-safe, so one thread owns it: it takes commands (add, abort) from a
queue, runs `engine.step()` while anything is unfinished, and fans each step's output out to
the requests' `RequestStream`s. Servers stay thin: they validate their protocol's input,
`submit` a request, and relay the `StreamEvent`s in their protocol's format.

A consumer may be a thread (iterate the stream, `get(timeout)`) or an asyncio task (`async
for`); a stream made by `add_async` hands events to the caller's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from apar_rt.core import SamplingParams
from apar_rt.scheduler import EngineOverloaded, RequestRejected
from apar_rt.serve.streamer import BranchEvent, ReadingOrderStreamer

log = logging.getLogger(__name__)

__all__ = ["EngineLoop", "RequestStream", "StreamEvent", "BranchEvent", "LoopStats", "LoopObserver",
           "chat_prompt_ids"]


@dataclass(slots=True)
class StreamEvent:
    """A request's progress in one engine step, or its end."""

    request_id: str
    text: str                                 # new text, in final reading order (may be "")
    new_tokens: int                           # tokens generated since the last event, over all branches
    finished: bool = False
    finish_reason: str | None = None          # "stop", "length", "abort" or "error", once finished
    error: str | None = None                  # why the request failed (finish_reason "error")
    internal_error: bool = False              # the failure is the server's fault, not the request's
    branches: list[BranchEvent] | None = None  # per-branch deltas, when the request asked for them
    prompt_tokens: int = 0
    generated_tokens: int = 0                 # so far, over all branches ([Child] tokens included)
    output: Any = None                        # the final RequestOutput (text, branches, stats)


@dataclass(frozen=True, slots=True)
class LoopStats:
    """A snapshot of the engine after a step, safe to read from any thread."""

    running: int = 0              # requests being decoded
    waiting: int = 0              # requests queued for admission
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0      # usable blocks (the null block excluded)
    forks: int = 0                # forks since start
    live_branches: int = 0        # APAR branches of running requests not yet finished
    steps: int = 0                # engine steps since start
    preemptions: int = 0


class LoopObserver(Protocol):
    """Receives timings from the loop thread (metrics)."""

    def on_first_token(self, seconds: float) -> None: ...
    def on_inter_token(self, seconds: float) -> None: ...
    def on_finish(self, seconds: float, reason: str, prompt_tokens: int, generated_tokens: int,
                  stats: dict | None) -> None: ...
    def on_stats(self, stats: LoopStats) -> None: ...


_CLOSED = object()


def _deliver(events: Sequence[tuple["RequestStream", StreamEvent]]) -> None:
    """Queue each (stream, event), in order, from the loop thread: a thread consumer's event at
    once, and all the events bound for one asyncio loop in one thread-safe call. Each such call
    wakes that loop (a write to its self-pipe, then a GIL hand-over to it): one per event cost the
    loop thread about 0.5 ms a step at 256 streams, against about 0.02 ms for one per step."""
    by_loop: dict = {}
    for stream, ev in events:
        if ev.finished:
            stream.finished = True
        if stream._q is not None:
            stream._q.put(ev)
        else:
            by_loop.setdefault(stream._aio_loop, []).append((stream._aq, ev))
    for aio_loop, items in by_loop.items():
        try:
            aio_loop.call_soon_threadsafe(_put_each, items)
        except RuntimeError:  # that consumer's event loop is closed: nobody is listening
            pass


def _put_each(items: list) -> None:
    for aq, ev in items:
        aq.put_nowait(ev)


class RequestStream:
    """The events of one request, in order; the last has `finished` set.

    Iterate it from a thread (`for ev in stream`, or `get(timeout)`), or `async for` it when
    it was made by `EngineLoop.add_async`. `cancel()` aborts the request (its KV blocks are
    freed) from any thread; the stream then ends with finish_reason "abort".
    """

    def __init__(self, owner: "EngineLoop", request_id: str,
                 aio_loop: asyncio.AbstractEventLoop | None = None,
                 sink: queue.SimpleQueue | None = None) -> None:
        self.request_id = request_id
        self.prompt_tokens = 0         # set on admission
        self._owner = owner
        self._aio_loop = aio_loop
        self._aq: asyncio.Queue | None = asyncio.Queue() if aio_loop is not None else None
        # a shared `sink` queue gathers the events of many streams (read them there, not here)
        self._q: queue.SimpleQueue | None = None if aio_loop is not None else (sink or queue.SimpleQueue())
        self.finished = False          # set in the loop thread when the final event is queued
        self._cancelled = False
        self._ended = False            # the consumer has taken the final event

    # ---- producer side (the loop thread) ----

    def _put(self, ev: StreamEvent) -> None:
        _deliver([(self, ev)])

    # ---- consumer side ----

    def cancel(self) -> None:
        """Abort the request; a no-op once it has finished or was cancelled."""
        if not self.finished and not self._cancelled:
            self._cancelled = True
            try:
                self._owner._command("abort", self.request_id)
            except RuntimeError:   # the loop is down: it has failed (or will fail) this request
                pass

    def get(self, timeout: float | None = None) -> StreamEvent | None:
        """The next event (sync streams); None if none came within `timeout` seconds."""
        if self._q is None:
            raise RuntimeError("this stream belongs to an asyncio loop; use `async for`")
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self):
        while not self._ended:
            ev = self.get()
            self._ended = ev.finished
            yield ev

    def __aiter__(self):
        if self._aq is None:
            raise RuntimeError("this stream is not bound to an asyncio loop; iterate it from a thread")
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        ev = await self._aq.get()
        self._ended = ev.finished
        return ev


@dataclass(slots=True)
class _Live:
    """The loop thread's state for one request."""

    stream: RequestStream
    request: Any                    # the engine's core.Request (its branches grow in place)
    streamer: ReadingOrderStreamer | None   # None: final only (one event, the whole text)
    want_branches: bool
    arrival: float
    prompt_tokens: int
    last_token_time: float | None = None
    hold: int = 0                   # steps whose text waits for a later event (stream_interval)
    held_tokens: int = 0            # tokens of the steps held so far


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | None
    params: SamplingParams
    prompt_token_ids: list[int]     # prepared off the engine thread
    branches: bool
    final_only: bool
    stream: RequestStream
    future: concurrent.futures.Future
    arrival: float = field(default_factory=time.monotonic)


class EngineLoop:
    """Owns an `Engine` in a daemon thread. Start it with `start()` (or use it as a context manager).

    `stream_interval`: a streamed request's new text goes out every this many steps (its first
    text at once, and its end), as SGLang's and TensorRT-LLM's stream_interval: the same text in
    fewer, longer events, each of which costs the loop and its consumer the same. Per-branch
    deltas (`branches`) always go out every step."""

    def __init__(self, engine, observer: LoopObserver | None = None, *, name: str = "apar-engine",
                 stream_interval: int = 1) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1 (steps), not {stream_interval}")
        self.engine = engine
        self.observer = observer
        self.stream_interval = stream_interval
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False
        self._closed = False                      # set (under _lock) once no command will be taken
        self._lock = threading.Lock()
        self._tokenizers: queue.SimpleQueue = queue.SimpleQueue()   # copies for `prepare` threads
        self._max_prompt_chars = _max_prompt_chars(engine)
        self.error: BaseException | None = None   # set if the loop thread died
        self.stats = LoopStats(kv_blocks_total=engine.scheduler.pool.capacity)

    # ---- lifecycle ----

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running end with an error, and any later command
        (submit, call) raises RuntimeError at once."""
        self._stopping = True
        self._commands.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._drain("the server is shutting down")

    def _command(self, kind: str, cmd) -> None:
        """Queue a command for the loop thread; RuntimeError at once if the loop is not running."""
        with self._lock:
            if self._closed or self._stopping or not self._thread.is_alive():
                raise RuntimeError(self._down_reason())
            self._commands.put((kind, cmd))

    def _down_reason(self) -> str:
        if self.error is not None:
            return f"the engine loop stopped after an internal error ({type(self.error).__name__})"
        if not self._thread.is_alive() and not self._stopping:
            return "the engine loop is not running (not started)"
        return "the engine loop is not running (the server is shutting down)"

    def __enter__(self) -> "EngineLoop":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # ---- submitting ----

    def submit(self, prompt: str | None = None, params: SamplingParams | None = None, *,
               prompt_token_ids: Sequence[int] | None = None, messages: list[dict] | None = None,
               raw: bool = False, branches: bool = False, final_only: bool = False,
               aio_loop: asyncio.AbstractEventLoop | None = None,
               sink: queue.SimpleQueue | None = None) -> concurrent.futures.Future:
        """Prepare a request in the caller's thread (templating and tokenizing happen here, never
        on the engine thread) and queue it. The future gives its `RequestStream`, or raises the
        ValueError (RequestRejected) naming why the request cannot be served. Raises RuntimeError
        at once when the loop is not running.

        Args:
            prompt: text, templated unless `raw` (as `apar-rt generate`).
            prompt_token_ids: token ids, used as they are (instead of `prompt`).
            messages: chat messages [{"role", "content"}], templated by `chat_prompt_ids`.
            branches: also stream per-branch deltas (`StreamEvent.branches`).
            final_only: the stream gets one event, the last, with the whole text (as vLLM's
                RequestOutputKind.FINAL_ONLY): for a client that does not stream, no text is made
                and no event is sent while the request runs. Not with `branches` (ValueError).
            aio_loop: the event loop of an asyncio consumer.
            sink: a queue shared by many requests that receives their events (each names its
                request_id), for one consumer thread serving them all; the future then also
                has `request_id` set, once the request is queued.
        """
        if not self.alive:
            raise RuntimeError(self._down_reason())
        if final_only and branches:
            raise ValueError("per-branch deltas (branches) are streamed: they cannot come with final_only")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        arrival = time.monotonic()
        try:
            ids = self.prepare(prompt, prompt_token_ids=prompt_token_ids, messages=messages, raw=raw)
        except ValueError as e:
            fut.set_exception(e)
            return fut
        except Exception as e:  # e.g. a chat template that fails to render
            log.exception("a request could not be prepared")
            fut.set_exception(ValueError(f"the request could not be prepared ({type(e).__name__}; "
                                         "details are in the server log)"))
            return fut
        rid = f"r{next(self._ids)}"
        stream = RequestStream(self, rid, aio_loop, sink)
        fut.request_id = rid
        self._command("add", _Add(rid, prompt, params or SamplingParams(), ids, branches, final_only, stream,
                                  fut, arrival))
        return fut

    def prepare(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                messages: list[dict] | None = None, raw: bool = False) -> list[int]:
        """A request's prompt token ids, made in the calling thread with a private tokenizer copy.

        A prompt far too long for the context is refused before tokenizing (ValueError), so a huge
        prompt costs little even to its own sender.
        """
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
        else:
            chars = len(prompt or "") if messages is None else sum(len(m["content"]) for m in messages)
            if chars > self._max_prompt_chars:
                raise RequestRejected(
                    f"the prompt has {chars} characters, far more than the model's context of "
                    f"{self.engine.config.max_model_len} tokens can hold")
            tok = self._take_tokenizer()
            try:
                if messages is not None:
                    ids = chat_prompt_ids(tok, messages)
                else:
                    from apar_rt.model.tokenizer import encode_prompt
                    ids = encode_prompt(tok, prompt or "", raw=raw)
            finally:
                self._tokenizers.put(tok)
        max_len = self.engine.config.max_model_len
        if len(ids) >= max_len:
            raise RequestRejected(f"the prompt has {len(ids)} tokens, but the model's context is {max_len} "
                                  "tokens (it must leave room for at least one new token)")
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens), in the calling thread."""
        tok = self._take_tokenizer()
        try:
            return list(tok(text, add_special_tokens=False).input_ids)
        finally:
            self._tokenizers.put(tok)

    def _take_tokenizer(self):
        """A tokenizer no other thread is using: the engine's own is the engine thread's."""
        try:
            return self._tokenizers.get_nowait()
        except queue.Empty:
            return copy.deepcopy(self.engine.tokenizer)

    def add(self, *args, timeout: float | None = None, **kw) -> RequestStream:
        """`submit` and wait for admission; for threaded consumers."""
        return self.submit(*args, **kw).result(timeout)

    async def add_async(self, *args, **kw) -> RequestStream:
        """`submit` (in a worker thread: tokenizing may take a while) and await admission; the
        stream is iterated with `async for`."""
        aio_loop = asyncio.get_running_loop()
        fut = await asyncio.to_thread(self.submit, *args, aio_loop=aio_loop, **kw)
        return await asyncio.wrap_future(fut)

    def call(self, fn: Callable[[Any], Any], timeout: float | None = 30.0) -> Any:
        """Run fn(engine) in the loop thread, between steps, and return its result. RuntimeError
        at once when the loop is not running (or stops before running it)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._command("call", (fn, fut))
        return fut.result(timeout)

    # ---- the loop thread ----

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands(block=not self.engine.has_unfinished())
                if self._stopping:
                    break
                if self.engine.has_unfinished():
                    self._step()
                self._publish_stats()
        except BaseException as e:  # a bug: fail every request rather than hang their clients
            log.exception("the engine loop died")
            self.error = e
            self._stopping = True
        finally:
            self._drain(self._down_reason() if self.error else "the server is shutting down")

    def _drain(self, reason: str) -> None:
        """Fail every live request and every command not taken; no command is accepted after."""
        with self._lock:
            self._closed = True
        for rid in list(self._live):
            self._fail(rid, reason)
        while True:  # requests that were submitted but never taken
            try:
                kind, cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind in ("add", "call"):
                fut = cmd.future if kind == "add" else cmd[1]
                if not fut.done():
                    fut.set_exception(RuntimeError(reason))

    def _take_commands(self, block: bool) -> None:
        try:
            first = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        cmds = [first]
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for i, (kind, cmd) in enumerate(cmds):
            try:
                if kind == "add":
                    self._add(cmd)
                elif kind == "abort":
                    self._abort(cmd)
                elif kind == "call":
                    fn, fut = cmd
                    try:
                        fut.set_result(fn(self.engine))
                    except Exception as e:
                        fut.set_exception(e)
            except BaseException:   # the loop dies: give the untaken commands back, to be failed
                for item in cmds[i:]:
                    self._commands.put(item)
                raise

    def _add(self, cmd: _Add) -> None:
        eng = self.engine
        try:
            rid = eng.add_request(cmd.prompt, cmd.params, prompt_token_ids=cmd.prompt_token_ids,
                                  request_id=cmd.request_id)
        except (ValueError, EngineOverloaded) as e:
            cmd.future.set_exception(e)
            return
        except Exception as e:
            log.exception("request %s could not be added", cmd.request_id)
            cmd.future.set_exception(ValueError(f"the request could not be added ({type(e).__name__}; "
                                                "details are in the server log)"))
            return
        req = eng._requests[rid]
        cmd.stream.prompt_tokens = len(req.prompt_token_ids)
        streamer = None if cmd.final_only else ReadingOrderStreamer.for_engine(eng, req)
        self._live[rid] = _Live(cmd.stream, req, streamer, cmd.branches, cmd.arrival, len(req.prompt_token_ids))
        cmd.future.set_result(cmd.stream)

    def _abort(self, rid: str) -> None:
        live = self._live.pop(rid, None)
        if live is None:
            return
        self.engine.abort_request(rid)
        req = live.request
        live.stream._put(StreamEvent(rid, "", 0, True, "abort", prompt_tokens=live.prompt_tokens,
                                     generated_tokens=req.generated_tokens))
        self._observe_finish(live, "abort")

    def _fail(self, rid: str, message: str) -> None:
        live = self._live.pop(rid, None)
        if live is None:
            return
        try:
            self.engine.abort_request(rid)
        except Exception:
            log.exception("aborting %s after a failure", rid)
        live.stream._put(StreamEvent(rid, "", 0, True, "error", error=message, internal_error=True,
                                     prompt_tokens=live.prompt_tokens,
                                     generated_tokens=live.request.generated_tokens))
        self._observe_finish(live, "error")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # A bug in the engine: the step's state is unknown, so fail what was running.
            log.exception("engine step failed")
            for rid in list(self._live):
                self._fail(rid, "internal error in the engine step (details are in the server log)")
            return
        now = time.monotonic()
        events: list[tuple[RequestStream, StreamEvent]] = []
        try:
            self._stream_outputs(outputs, now, events)
        finally:   # what was made is delivered, even if a bug stopped the step half-way
            _deliver(events)

    def _stream_outputs(self, outputs, now: float, events: list) -> None:
        """Each output's stream event (text in reading order), appended to `events`; a request whose
        text fails ends alone."""
        for o in outputs:
            live = self._live.get(o.request_id)
            if live is None:
                continue
            ntok = sum(len(d.new_token_ids) for d in o.deltas)
            if ntok:
                if live.last_token_time is None:
                    self._obs("on_first_token", now - live.arrival)
                else:
                    self._obs("on_inter_token", now - live.last_token_time)
                live.last_token_time = now
            req = live.request
            streamer = live.streamer
            if not o.finished and (streamer is None or live.hold):
                # final only (nothing until the end), or stream_interval: this step's text and
                # tokens go with a later event
                if live.hold:
                    live.hold -= 1
                live.held_tokens += ntok
                continue
            if live.held_tokens:
                ntok += live.held_tokens
                live.held_tokens = 0
            try:
                if streamer is None:
                    text = o.text or ""
                else:
                    text = streamer.finish(o.text or "") if o.finished else streamer.step(o.deltas)
                branch_events = streamer.branch_events(o.deltas) if live.want_branches else None
            except Exception:  # a detokenizer failure ends only this request
                log.exception("streaming %s failed", o.request_id)
                self._fail(o.request_id, "internal error while detokenizing (details are in the server log)")
                continue
            if text and not live.want_branches:
                live.hold = self.stream_interval - 1
            ev = StreamEvent(o.request_id, text, ntok, o.finished, prompt_tokens=live.prompt_tokens,
                             generated_tokens=req.generated_tokens, branches=branch_events)
            if o.finished:
                ev.finish_reason = o.finish_reason.value if o.finish_reason else "stop"
                ev.error = o.error
                ev.output = o
                del self._live[o.request_id]
                self._observe_finish(live, ev.finish_reason, o.stats)
            events.append((live.stream, ev))

    def _observe_finish(self, live: _Live, reason: str, stats: dict | None = None) -> None:
        self._obs("on_finish", time.monotonic() - live.arrival, reason, live.prompt_tokens,
                  live.request.generated_tokens, stats)

    def _obs(self, method: str, *args) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, method)(*args)
            except Exception:  # metrics must never take the loop down
                log.exception("observer %s failed", method)

    def _publish_stats(self) -> None:
        s = self.engine.scheduler
        self.stats = LoopStats(running=len(s.running), waiting=len(s.waiting), kv_blocks_used=s.pool.num_used,
                               kv_blocks_total=s.pool.capacity, forks=s.num_forks,
                               live_branches=sum(r.num_live for r in s.running),
                               steps=self.engine.num_steps, preemptions=s.num_preemptions)
        self._obs("on_stats", self.stats)


# ---- prompts -----------------------------------------------------------------------------

def _max_prompt_chars(engine) -> int:
    """Characters beyond which a prompt cannot fit the context: no token spells more than the
    longest vocabulary entry (x4 for normalizers that shrink text)."""
    try:
        longest = max((len(t) for t in engine.tokenizer.get_vocab()), default=16)
    except Exception:
        longest = 64
    return 4 * max(longest, 1) * engine.config.max_model_len


_ROLES = ("system", "user", "assistant")


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids for a chat: the checkpoint's chat template, else the Vicuna v1.1 template.

    One user message gives exactly the ids of `apar-rt generate PROMPT` (`encode_prompt`).
    Raises ValueError for a conversation that does not end with a user message.
    """
    from apar_rt.model.tokenizer import VICUNA_V1_1_SYSTEM, encode_prompt

    if not messages or messages[-1]["role"] != "user":
        raise ValueError("messages must end with a user message")
    if len(messages) == 1:
        return encode_prompt(tokenizer, messages[0]["content"])
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    system = VICUNA_V1_1_SYSTEM
    text = ""
    for m in messages:  # FastChat's vicuna_v1.1: "USER: u ASSISTANT: a</s>USER: ..."
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            text += f"USER: {m['content']} "
        else:
            text += f"ASSISTANT: {m['content']}{tokenizer.eos_token or ''}"
    return list(tokenizer(f"{system} {text}ASSISTANT:").input_ids)
