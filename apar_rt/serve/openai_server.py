"""An OpenAI-compatible HTTP server over the engine loop (`apar-rt serve`).

Endpoints:
    POST /v1/completions        prompt -> text (the prompt is used as is: no chat template)
    POST /v1/chat/completions   messages -> reply (the model's chat template, else Vicuna v1.1)
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus)

Both POST endpoints stream (SSE, `"stream": true`) or not, with n=1, max_tokens
(max_completion_tokens for chat), temperature, top_p, stop, seed, logit_bias, user,
stream_options.include_usage, and `usage` in the answer. Extensions (flat fields; with the
`openai` client pass them in `extra_body`): `top_k`, `ignore_eos`, `stop_token_ids`, and
`apar_branches` (below). Fields OpenAI defines but apar-rt does not implement are accepted
only at their neutral value (e.g. `echo: false`, `logprobs: null`, `presence_penalty: 0`);
any other field is an error, as in OpenAI's own API.

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
(bad request), 404 (unknown model or route), 405, 500 (server fault) or 503 (engine down); a
failure after a stream has started is sent as a `data: {"error": ...}` event. A client that
disconnects aborts its request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from apar_rt.core import SamplingParams
from apar_rt.serve.engine_loop import EngineLoop, RequestStream, StreamEvent

log = logging.getLogger(__name__)


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


@dataclass(slots=True)
class _Parsed:
    params: SamplingParams
    stream: bool
    include_usage: bool
    branches: bool
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None


def _parse_common(body: dict, allowed: set[str], default_max_tokens: int, server: "_State") -> dict:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise OpenAIError(f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
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
    if set(opts) - {"include_usage"}:
        raise OpenAIError(f"Unrecognized stream_options: {', '.join(sorted(set(opts) - {'include_usage'}))}",
                          param="stream_options")
    if opts and not stream:
        raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")
    include_usage = bool(opts.get("include_usage", False))
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
    bias = _get(body, "logit_bias", lambda v: isinstance(v, dict), "an object mapping token ids to numbers",
                {})
    logit_bias = {}
    for k, v in bias.items():
        try:
            tok = int(k)
        except ValueError:
            raise OpenAIError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
        if not _is_num(v):
            raise OpenAIError(f"logit_bias values must be numbers, got {json.dumps(v)}", param="logit_bias")
        logit_bias[tok] = float(v)
    max_tokens = default_max_tokens
    for key in ("max_tokens", "max_completion_tokens"):
        if key in allowed and body.get(key) is not None:
            max_tokens = _get(body, key, _is_int, "an integer")
            if max_tokens < 1:
                raise OpenAIError(f"{key} must be at least 1, got {max_tokens}", param=key)
    kwargs = dict(max_tokens=max_tokens, temperature=float(temperature),
                  top_p=float(_get(body, "top_p", _is_num, "a number", 1.0)),
                  top_k=_get(body, "top_k", _is_int, "an integer", 0),
                  seed=_get(body, "seed", _is_int, "an integer"), stop=stop, logit_bias=logit_bias,
                  ignore_eos=_get(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False),
                  stop_token_ids=tuple(_get(body, "stop_token_ids",
                                            lambda v: isinstance(v, list) and all(map(_is_int, v)),
                                            "a list of integers", [])))
    _get(body, "user", lambda v: isinstance(v, str), "a string")
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        msg = str(e)
        raise OpenAIError(msg, param=next((k for k in kwargs if msg.startswith(k)), None)) from None
    return dict(params=params, stream=stream, include_usage=include_usage,
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


def _usage(ev: StreamEvent) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.generated_tokens,
            "total_tokens": ev.prompt_tokens + ev.generated_tokens}


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


async def _read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(f"We could not parse the JSON body of your request ({e}). The body must be a "
                          "JSON object.") from None
    if not isinstance(body, dict):
        raise OpenAIError("The request body must be a JSON object.")
    return body


async def _admit(state: _State, p: _Parsed) -> RequestStream:
    if not state.loop.alive:
        raise OpenAIError("the engine is not running", status=503, type="server_error")
    try:
        return await state.loop.add_async(p.prompt, p.params, prompt_token_ids=p.prompt_token_ids,
                                          messages=p.messages, raw=True, branches=p.branches)
    except ValueError as e:
        msg = str(e)
        param = "messages" if p.messages is not None else "prompt"
        code = "context_length_exceeded" if ("context" in msg or "KV cache" in msg) else None
        if "logit_bias" in msg:
            param, code = "logit_bias", None
        raise OpenAIError(msg, param=param, code=code) from None
    except RuntimeError as e:
        raise OpenAIError(str(e), status=503, type="server_error") from None


def build_app(loop: EngineLoop, model_names: str | list[str], metrics=None, *,
              default_temperature: float = 1.0) -> Starlette:
    """The ASGI app. `model_names`: the names clients may pass as `model` (the first is listed).
    `default_temperature`: used when a request gives none (1.0, as OpenAI's API)."""
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
        if chat:   # OpenAI's first chat chunk announces the role
            yield _sse(_chunk("", True, rid, created, model, None, first=True))
        async for ev in stream:
            if ev.finished and ev.finish_reason in ("error", "abort"):
                if ev.finish_reason == "error":
                    yield _sse(_event_error(ev).body())
                    yield b"data: [DONE]\n\n"
                return      # abort: the client is gone
            finish = _finish_reason(ev) if ev.finished else None
            if ev.text or ev.branches or finish:
                yield _sse(_chunk(ev.text, chat, rid, created, model, finish, ev.branches))
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
        log.exception("unhandled error in %s", request.url.path)
        return OpenAIError(f"internal server error: {exc!r}", status=500, type="server_error").response()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_endpoint, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def _model_card(state: _State, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "apar-rt",
            "max_model_len": state.max_model_len}


# ---- running it --------------------------------------------------------------------------

class OpenAIServer:
    """The engine loop plus uvicorn, in the foreground (`run`) or a background thread (`start`)."""

    def __init__(self, engine, model_names: str | list[str], *, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "warning", default_temperature: float = 1.0) -> None:
        from apar_rt.serve.metrics import ServingMetrics

        self.metrics = ServingMetrics(engine)
        self.loop = EngineLoop(engine, self.metrics)
        self.app = build_app(self.loop, model_names, self.metrics,
                             default_temperature=default_temperature)
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
