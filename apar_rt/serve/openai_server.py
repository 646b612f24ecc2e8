"""An OpenAI-compatible HTTP server over the engine loop (`apar-rt serve`).

Endpoints:
    POST /v1/completions        prompt -> text (the prompt is used as is: no chat template)
    POST /v1/chat/completions   messages -> reply (the model's chat template, else Vicuna v1.1)
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus)

Both POST endpoints stream (SSE, `"stream": true`) or not, with n=1, max_tokens
(max_completion_tokens for chat), temperature, top_p, stop, seed, logit_bias, user,
stream_options (include_usage; vLLM's continuous_usage_stats, which with include_usage puts the
usage so far in every chunk; include_obfuscation, accepted and ignored), and `usage` in the
answer. Extensions (flat fields; with the `openai` client pass them in `extra_body`): `top_k`,
`ignore_eos`, `stop_token_ids`, and `apar_branches` (below). Fields OpenAI defines but apar-rt
does not implement are accepted only at their neutral value (e.g. `echo: false`, `logprobs:
null`, `presence_penalty: 0`); fields clients send that change nothing here (`store`, `metadata`,
`service_tier`, `skip_special_tokens`, ...: `_IGNORED`) are ignored with a logged note; any other
field is an error, as in OpenAI's own API.

Validation (as vLLM's): a temperature below 1e-5 is greedy; numbers must be finite and in range
(integers are range-checked before any cast); logit_bias keys are canonical decimal token ids,
at most 300 of them. Bodies over `max_body_bytes` (4 MiB) get 413 before they are read; with an
API key, every /v1 route (and /metrics if `protect_metrics`) wants `Authorization: Bearer KEY`.
Prompts are templated and tokenized in worker threads, never on the engine's thread.

Streaming order: APAR branches write at the same time. The standard stream sends the text
in final reading order, each piece as soon as everything before it in the paragraph tree is
settled, so the concatenated deltas equal the non-streamed text exactly.

The `apar_branches` extension (opt-in, `"apar_branches": true`): every streamed chunk also
carries the branches that progressed in that engine step,

    "apar": {"branches": [{"id": 2, "parent": 0, "fork_index": 17, "token_ids": [...],
                           "text": " new text of branch 2's own paragraph", "finished": false}]}

`id` 0 is the root; a child's first token is the forced [Child] and `fork_index` is the index
of the [Fork] in its parent's tokens that spawned it. A non-streamed answer carries the whole
tree as "apar": {"branches": [{"id", "parent", "fork_index", "token_ids", "text"}], "stats": {...}}.
Chunks may then have an empty text delta.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}, with status 400
(bad request, malformed JSON included), 401 (API key), 404 (unknown model or route), 405, 413
(body too large), 429 (the waiting queue is full: --max-waiting; requests already admitted go
on), 500 (server fault; no internal detail is sent) or 503 (engine down); a
failure after a stream has started is sent as a `data: {"error": ...}` event. A client that
disconnects aborts its request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from apar_rt.core import MAX_LOGIT_BIAS, SamplingParams
from apar_rt.scheduler import EngineOverloaded
from apar_rt.serve.engine_loop import EngineLoop, RequestStream, StreamEvent

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 << 20     # 4 MiB: larger request bodies get 413 before they are read


class OpenAIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- request validation ------------------------------------------------------------------

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "logit_bias", "user", "presence_penalty", "frequency_penalty",
           # extensions
           "top_k", "ignore_eos", "stop_token_ids", "apar_branches"}
_COMPLETION = _COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "parallel_tool_calls"}
# accepted only at these neutral values
_NEUTRAL = {"echo": (False,), "logprobs": (None, False, 0), "best_of": (None, 1), "suffix": (None, ""),
            "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "top_logprobs": (None, 0),
            "parallel_tool_calls": (None, True, False)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, key: str, check, what: str, default=None):
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise OpenAIError(f"{key} must be {what}, got {json.dumps(v)[:80]}", param=key)
    return v


_STREAM_OPTIONS = {"include_usage", "continuous_usage_stats", "include_obfuscation"}
# Fields real clients send that change nothing apar-rt computes: accepted, and logged once.
_IGNORED = {"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "request_id",
            "priority", "skip_special_tokens", "spaces_between_special_tokens", "add_special_tokens"}
_logged_ignored: set[str] = set()
_TOKEN_ID = re.compile(r"(0|[1-9][0-9]{0,9})")     # a canonical decimal token id


def _parse_logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias}; keys are canonical decimal ids, at most MAX_LOGIT_BIAS."""
    bias = _get(body, "logit_bias", lambda v: isinstance(v, dict), "an object mapping token ids to numbers",
                {})
    if len(bias) > MAX_LOGIT_BIAS:
        raise OpenAIError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}",
                          param="logit_bias")
    out = {}
    for k, v in bias.items():
        if not _TOKEN_ID.fullmatch(k):
            raise OpenAIError(f"logit_bias keys must be token ids written in decimal (like \"42\"), got "
                              f"{json.dumps(k)[:40]}", param="logit_bias")
        if not _is_num(v) or not -100 <= v <= 100:
            raise OpenAIError(f"logit_bias values must be numbers in [-100, 100], got {json.dumps(v)[:40]} "
                              f"for token {k}", param="logit_bias")
        out[int(k)] = v
    return out


@dataclass(slots=True)
class _Parsed:
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool
    branches: bool
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None


def _parse_common(body: dict, allowed: set[str], default_max_tokens: int, server: "_State") -> dict:
    unknown = sorted(set(body) - allowed - _IGNORED)
    if unknown:
        raise OpenAIError(f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    for key in sorted(set(body) & _IGNORED - _logged_ignored):
        _logged_ignored.add(key)
        log.info("ignoring the request field %r (a client extension that does not change the output); "
                 "logged once", key)
    for key, ok in _NEUTRAL.items():
        if key in body and key in allowed and body[key] not in ok:
            raise OpenAIError(f"{key}={json.dumps(body[key])} is not supported by apar-rt "
                              f"(supported: {', '.join(json.dumps(v) for v in ok)})", param=key)
    model = body.get("model")
    if model is None:
        raise OpenAIError("you must provide a model parameter", param="model")
    if model not in server.model_names:
        raise OpenAIError(f"The model `{model}` does not exist. This server serves "
                          f"{', '.join(repr(m) for m in server.model_names)}.", status=404,
                          param="model", code="model_not_found")
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise OpenAIError(f"n must be 1 (apar-rt returns one choice per request), got {n}", param="n")
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    opts = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    if set(opts) - _STREAM_OPTIONS:
        raise OpenAIError(f"Unrecognized stream_options: {', '.join(sorted(set(opts) - _STREAM_OPTIONS))} "
                          f"(known: {', '.join(sorted(_STREAM_OPTIONS))})", param="stream_options")
    for key, v in opts.items():
        if v is not None and not isinstance(v, bool):
            raise OpenAIError(f"stream_options.{key} must be a boolean, got {json.dumps(v)[:40]}",
                              param="stream_options")
    if opts and not stream:
        raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")
    include_usage = bool(opts.get("include_usage", False))
    continuous_usage = bool(opts.get("continuous_usage_stats", False))
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise OpenAIError("stop must be a string or a list of strings", param="stop")
    temperature = _get(body, "temperature", _is_num, "a number", server.default_temperature)
    if not 0 <= temperature <= 2:
        raise OpenAIError(f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    logit_bias = _parse_logit_bias(body)
    max_tokens = default_max_tokens
    for key in ("max_tokens", "max_completion_tokens"):
        if key in allowed and body.get(key) is not None:
            max_tokens = _get(body, key, _is_int, "an integer")
            if max_tokens < 1:
                raise OpenAIError(f"{key} must be at least 1, got {max_tokens}", param=key)
    top_k = _get(body, "top_k", _is_int, "an integer", 0)
    kwargs = dict(max_tokens=max_tokens, temperature=temperature,
                  top_p=_get(body, "top_p", _is_num, "a number", 1.0),
                  top_k=0 if top_k == -1 else top_k,     # -1 also disables it, as in vLLM
                  seed=_get(body, "seed", _is_int, "an integer"), stop=stop, logit_bias=logit_bias,
                  ignore_eos=_get(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False),
                  stop_token_ids=tuple(_get(body, "stop_token_ids",
                                            lambda v: isinstance(v, list) and all(map(_is_int, v)),
                                            "a list of integers", [])))
    _get(body, "user", lambda v: isinstance(v, str), "a string")
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        msg = str(e)   # SamplingParams names the field first ("stop_token_ids must be ...")
        field = re.match(r"\w+", msg)
        raise OpenAIError(msg, param=field[0] if field and field[0] in kwargs else None) from None
    return dict(params=params, stream=stream, include_usage=include_usage, continuous_usage=continuous_usage,
                branches=_get(body, "apar_branches", lambda v: isinstance(v, bool), "a boolean", False))


def parse_completion(body: dict, server: "_State") -> _Parsed:
    p = _Parsed(**_parse_common(body, _COMPLETION, 16, server))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]        # a batch of one
    if isinstance(prompt, str):
        p.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(map(_is_int, prompt)):
        p.prompt_token_ids = prompt
    elif prompt is None:
        raise OpenAIError("you must provide a prompt parameter", param="prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(x, (str, list)) for x in prompt):
        raise OpenAIError("apar-rt takes one prompt per request; send the prompts as separate requests",
                          param="prompt")
    else:
        raise OpenAIError("prompt must be a string or a list of token ids", param="prompt")
    return p


def parse_chat(body: dict, server: "_State") -> _Parsed:
    p = _Parsed(**_parse_common(body, _CHAT, server.max_model_len, server))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) >= server.max_model_len:   # every message takes at least one token
        raise OpenAIError(f"{len(messages)} messages cannot fit the model's context of "
                          f"{server.max_model_len} tokens", param="messages", code="context_length_exceeded")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise OpenAIError(f"messages[{i}] must be an object with role system, user or assistant",
                              param=f"messages[{i}]")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise OpenAIError(f"Unrecognized argument in messages[{i}]: {', '.join(sorted(extra))}",
                              param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise OpenAIError(f"messages[{i}].content parts must be text parts", param=f"messages[{i}]")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise OpenAIError(f"messages[{i}].content must be a string", param=f"messages[{i}]")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise OpenAIError("the last message must be a user message", param="messages")
    p.messages = out
    return p


# ---- the app -----------------------------------------------------------------------------

@dataclass(slots=True)
class _State:
    loop: EngineLoop
    model_names: tuple[str, ...]
    max_model_len: int
    metrics: Any
    created: int
    default_temperature: float


def _chunk(ev_text: str, chat: bool, rid: str, created: int, model: str, finish: str | None,
           branches=None, first: bool = False) -> dict:
    if chat:
        if first:
            delta = {"role": "assistant", "content": ev_text}
        else:
            delta = {"content": ev_text} if ev_text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": ev_text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    d = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if branches:
        d["apar"] = {"branches": [b.to_json() for b in branches]}
    return d


def _usage(ev: StreamEvent, cap: int | None = None) -> dict:
    done = ev.generated_tokens if cap is None else min(ev.generated_tokens, cap)
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": done, "total_tokens": ev.prompt_tokens + done}


def _finish_reason(ev: StreamEvent) -> str:
    return ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"


def _event_error(ev: StreamEvent) -> OpenAIError:
    if ev.internal_error:
        return OpenAIError(ev.error or "internal error", status=500, type="server_error")
    return OpenAIError(ev.error or "the request failed", status=400)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class EventStreamResponse(Response):
    """SSE that also watches for the client's disconnect and then cancels the request."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], stream: RequestStream) -> None:
        self.events = events
        self.stream = stream
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        watch = asyncio.create_task(_cancel_on_disconnect(receive, self.stream))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:   # the client went away while we wrote
            pass
        finally:
            watch.cancel()
            self.stream.cancel()    # a no-op once the request has finished


async def _cancel_on_disconnect(receive, stream: RequestStream) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            stream.cancel()
            return


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request) -> dict:
    """The body as a JSON object; OpenAIError (400) for anything else, with no internal detail."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise OpenAIError("We could not parse the JSON body of your request: it is nested too deeply.") \
            from None
    except json.JSONDecodeError as e:
        raise OpenAIError(f"We could not parse the JSON body of your request ({e.msg} at character {e.pos}). "
                          "The body must be a JSON object.") from None
    except UnicodeDecodeError:
        raise OpenAIError("We could not parse the JSON body of your request: it is not valid UTF-8.") \
            from None
    except ValueError as e:   # NaN/Infinity, or an integer beyond Python's 4300-digit limit
        what = str(e) if "is not valid JSON" in str(e) else "a number in it is too long"
        raise OpenAIError(f"We could not parse the JSON body of your request: {what}.") from None
    if not isinstance(body, dict):
        raise OpenAIError("The request body must be a JSON object.")
    try:   # a lone surrogate (an unpaired \\ud800 escape) is no Unicode text: refuse it here, once
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError("The request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                          "escape); strings must be valid Unicode.") from None
    return body


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware run before any handler reads a body: the API key (on /v1 routes, and on
    /metrics if asked), then the body limit (413 from Content-Length before reading; a chunked
    body is cut off as soon as it passes the limit)."""

    def __init__(self, app, *, api_key: str | None = None, protect_metrics: bool = False,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.protect_metrics = protect_metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.api_key and (path == "/v1" or path.startswith("/v1/")
                             or (self.protect_metrics and path == "/metrics")):
            auth = headers.get(b"authorization", b"")
            if not (auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self.api_key)):
                err = OpenAIError("Incorrect or missing API key: pass it as 'Authorization: Bearer KEY'.",
                                  status=401, code="invalid_api_key")
                return await _send_json(send, err, {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                return await _send_json(send, OpenAIError("Content-Length is not a valid number."))
            if int(length) > self.max_body_bytes:
                return await _send_json(send, _too_large(self.max_body_bytes))
            return await self.app(scope, receive, send)
        seen = 0
        limit = self.max_body_bytes

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return msg

        return await self.app(scope, counted, send)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(f"The request body is larger than this server's limit of {limit} bytes "
                       "(apar-rt serve --max-body-bytes).", status=413, code="request_too_large")


async def _send_json(send, err: OpenAIError, headers: dict | None = None) -> None:
    body = json.dumps(err.body()).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def _admit(state: _State, p: _Parsed) -> RequestStream:
    if not state.loop.alive:
        raise OpenAIError("the engine is not running", status=503, type="server_error")
    try:
        # a response that is not streamed needs only the final text: no event while it runs
        return await state.loop.add_async(p.prompt, p.params, prompt_token_ids=p.prompt_token_ids,
                                          messages=p.messages, raw=True, branches=p.branches,
                                          final_only=not p.stream and not p.branches)
    except ValueError as e:
        msg = str(e)
        param = "messages" if p.messages is not None else "prompt"
        code = "context_length_exceeded" if ("context" in msg or "KV cache" in msg) else None
        if "logit_bias" in msg:
            param, code = "logit_bias", None
        raise OpenAIError(msg, param=param, code=code) from None
    except EngineOverloaded as e:
        raise OpenAIError(str(e), status=429, type="server_overloaded", code="max_waiting") from None
    except RuntimeError as e:
        raise OpenAIError(str(e), status=503, type="server_error") from None


def build_app(loop: EngineLoop, model_names: str | list[str], metrics=None, *,
              default_temperature: float = 1.0, api_key: str | None = None, protect_metrics: bool = False,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The ASGI app. `model_names`: the names clients may pass as `model` (the first is listed).
    `default_temperature`: used when a request gives none (1.0, as OpenAI's API).
    `api_key`: required as 'Authorization: Bearer KEY' on every /v1 route (and on /metrics when
    `protect_metrics`). `max_body_bytes`: larger bodies get 413 before they are read."""
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    state = _State(loop, names, loop.engine.config.max_model_len, metrics, int(time.time()),
                   default_temperature)

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        try:
            body = await _read_json(request)
            p = parse_chat(body, state) if chat else parse_completion(body, state)
            stream = await _admit(state, p)
        except OpenAIError as e:
            return e.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, model = int(time.time()), body["model"]
        if p.stream:
            return EventStreamResponse(_stream_events(stream, p, chat, rid, created, model), stream)
        return await _complete(request, stream, p, chat, rid, created, model)

    async def _stream_events(stream, p: _Parsed, chat, rid, created, model) -> AsyncIterator[bytes]:
        # vLLM's stream_options.continuous_usage_stats: usage so far in every chunk
        every = p.include_usage and p.continuous_usage
        if chat:   # OpenAI's first chat chunk announces the role
            first = _chunk("", True, rid, created, model, None, first=True)
            if every:
                first["usage"] = {"prompt_tokens": stream.prompt_tokens, "completion_tokens": 0,
                                  "total_tokens": stream.prompt_tokens}
            yield _sse(first)
        async for ev in stream:
            if ev.finished and ev.finish_reason in ("error", "abort"):
                if ev.finish_reason == "error":
                    yield _sse(_event_error(ev).body())
                    yield b"data: [DONE]\n\n"
                return      # abort: the client is gone
            finish = _finish_reason(ev) if ev.finished else None
            if ev.text or ev.branches or finish:
                chunk = _chunk(ev.text, chat, rid, created, model, finish, ev.branches)
                if every:   # tokens past the reading-order budget are cut at the end: never count them
                    cap = min(p.params.max_tokens, state.max_model_len - ev.prompt_tokens)
                    chunk["usage"] = _usage(ev, cap)
                yield _sse(chunk)
            if ev.finished:
                if p.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": model, "choices": [], "usage": _usage(ev)})
                yield b"data: [DONE]\n\n"

    async def _complete(request: Request, stream: RequestStream, p: _Parsed, chat, rid, created, model):
        watch = asyncio.create_task(_cancel_on_disconnect(request.receive, stream))
        text, branch_text = [], {}
        try:
            async for ev in stream:
                text.append(ev.text)
                for b in ev.branches or ():
                    branch_text[b.id] = branch_text.get(b.id, "") + b.text
        finally:
            watch.cancel()
            stream.cancel()
        if ev.finish_reason == "error":
            return _event_error(ev).response()
        if ev.finish_reason == "abort":
            return OpenAIError("the request was cancelled", status=499).response()
        finish = _finish_reason(ev)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish}
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
               "model": model, "choices": [choice], "usage": _usage(ev)}
        if p.branches and ev.output is not None:
            out["apar"] = {"branches": [dict(b, text=branch_text.get(b["id"], ""))
                                        for b in ev.output.branches],
                           "stats": ev.output.stats}
        return JSONResponse(out)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state, names[0])]})

    async def model(request: Request) -> Response:
        mid = request.path_params["model_id"]
        if mid not in names:
            return OpenAIError(f"The model `{mid}` does not exist.", status=404, param="model",
                               code="model_not_found").response()
        return JSONResponse(_model_card(state, mid))

    async def health(request: Request) -> Response:
        if not loop.alive:
            return JSONResponse({"status": "error", "error": repr(loop.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(request: Request) -> Response:
        if metrics is None:
            return OpenAIError("metrics are not enabled", status=404).response()
        from apar_rt.serve.metrics import CONTENT_TYPE
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse({"error": {"message": msg, "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error in %s", request.url.path, exc_info=exc)
        return OpenAIError("internal server error (details are in the server log)", status=500,
                           type="server_error").response()

    async def too_large(request: Request, exc: _BodyTooLarge) -> Response:
        return _too_large(max_body_bytes).response()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_endpoint, methods=["GET"])]
    guard = Middleware(RequestGuard, api_key=api_key, protect_metrics=protect_metrics,
                       max_body_bytes=max_body_bytes)
    return Starlette(routes=routes, middleware=[guard],
                     exception_handlers={HTTPException: http_error, _BodyTooLarge: too_large,
                                         Exception: server_error})


def _model_card(state: _State, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "apar-rt",
            "max_model_len": state.max_model_len}


# ---- running it --------------------------------------------------------------------------

class OpenAIServer:
    """The engine loop plus uvicorn, in the foreground (`run`) or a background thread (`start`)."""

    def __init__(self, engine, model_names: str | list[str], *, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "warning", default_temperature: float = 1.0, api_key: str | None = None,
                 protect_metrics: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 stream_interval: int = 1) -> None:
        from apar_rt.serve.metrics import ServingMetrics

        self.metrics = ServingMetrics(engine)
        self.loop = EngineLoop(engine, self.metrics, stream_interval=stream_interval)
        self.app = build_app(self.loop, model_names, self.metrics, default_temperature=default_temperature,
                             api_key=api_key, protect_metrics=protect_metrics, max_body_bytes=max_body_bytes)
        self.host, self.port, self.log_level = host, port, log_level
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        return uvicorn.Server(config)

    def _socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        return sock

    def run(self) -> None:
        """Serve until interrupted."""
        sock = self._socket()
        self.loop.start()
        self._server = self._uvicorn()
        try:
            self._server.run(sockets=[sock])
        finally:
            self.loop.close()

    def start(self, timeout: float = 30.0) -> "OpenAIServer":
        """Serve from a background thread (port 0 picks a free port); returns once listening."""
        sock = self._socket()
        self.loop.start()
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="apar-openai-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
