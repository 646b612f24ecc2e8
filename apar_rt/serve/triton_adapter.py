"""The Triton model's logic, kept free of `triton_python_backend_utils` so it can be tested alone.

`runtime/model_repository/apar/1/model.py` is a thin shell: it hands each request's input
tensors and a response-sender wrapper to `TritonServing.submit`, which validates the inputs,
queues the request on the shared `EngineLoop` (one engine, in-flight batching across all
requests), and relays the request's events from a small thread:

- `stream` true: one response per new piece of reading-order text, the last one flagged final
  (its text may be empty);
- `stream` false: exactly one response with the whole text (what `/generate` needs).

Inputs (tensorrtllm_backend's names, plus apar-rt's):

| name | type | default | meaning |
|---|---|---|---|
| text_input | STRING | required | the prompt |
| max_tokens | INT32 | parameter default_max_tokens | output tokens: the tree's first N in reading order |
| stream | BOOL | false | stream the text |
| temperature | FP32 | 0 | 0 is greedy |
| top_p | FP32 | 1 | 0 also disables it (TensorRT-LLM's convention) |
| top_k | INT32 | 0 | 0 disables it |
| end_id | INT32 | - | an extra token id that ends a branch, as EOS does; -1: ignore EOS (run to max_tokens) |
| stop_words | STRING [-1] | - | stop strings |
| embedding_bias_words | STRING [-1] | - | logit bias: each word's tokens get ... |
| embedding_bias_weights | FP32 [-1] | - | ... the weight at the same index |
| random_seed | UINT64 | - | sampling seed |
| mode | STRING | the engine's | "apar" or "ar" for this request (SamplingParams.mode) |
| medusa | BOOL | false | true asserts the engine runs Medusa (an error if it has no heads); Medusa is
  set per model (parameter medusa) and its greedy verification is lossless |
| raw | BOOL | parameter raw | feed the prompt as is (no chat template) |
| exclude_input_in_output | BOOL | true | false: the output starts with the prompt (tensorrtllm_backend) |
| return_log_probs, return_context_logits, return_generation_logits | BOOL | false | true is unsupported |
| beam_width | INT32 | 1 | other values are unsupported |
| min_length | INT32 | 0 | values above 1 are unsupported |
| pad_id | INT32 | - | accepted and unused |

A bad request gets a Triton error (INVALID_ARG) for that request only; a failure inside the
engine fails only its own request (INTERNAL). A cancelled request (the client stopped its
stream), or one whose response cannot be sent, is aborted and its KV blocks freed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from apar_rt.core import MAX_LOGIT_BIAS, SamplingParams
from apar_rt.serve.engine_loop import EngineLoop
from apar_rt.serve.metric_names import ServingCounters

log = logging.getLogger(__name__)

INPUT_NAMES = ("text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "end_id", "stop_words",
               "embedding_bias_words", "embedding_bias_weights", "random_seed", "mode", "medusa", "raw",
               "exclude_input_in_output", "return_log_probs", "return_context_logits",
               "return_generation_logits", "beam_width", "min_length", "pad_id")
# tensorrtllm_backend's optional inputs that clients such as genai-perf send: accepted at these
# neutral values, answered as unsupported otherwise (pad_id is accepted at any value: no padding here)
NEUTRAL_INPUTS: dict[str, tuple] = {"return_log_probs": (False,), "return_context_logits": (False,),
                                    "return_generation_logits": (False,), "beam_width": (1,),
                                    "min_length": (0, 1)}

# config.pbtxt parameters -> (type, default)
# (None: not given; the engine's default, or an engine folder's manifest, applies)
PARAMETERS: dict[str, tuple[type, Any]] = {
    "engine_dir": (str, ""), "backend": (str, ""), "mode": (str, "apar"), "dtype": (str, "auto"),
    "device": (str, ""), "num_blocks": (int, None), "block_size": (int, None), "max_num_seqs": (int, None),
    "max_num_tokens": (int, None), "long_prefill_token_threshold": (int, None), "max_model_len": (int, None),
    "max_depth": (int, None),
    "medusa": (str, ""), "medusa_tree": (str, None), "acceptance": (str, None), "text_join": (str, None),
    "speculative_disable_by_batch_size": (int, None),
    "default_max_tokens": (int, 256), "raw": (bool, False), "torch_threads": (int, 0),
    "stream_interval": (int, 1),
}
_ENGINE_KWARGS = ("mode", "num_blocks", "block_size", "max_num_seqs", "max_num_tokens",
                  "long_prefill_token_threshold", "max_model_len", "max_depth", "medusa_tree", "acceptance",
                  "text_join", "speculative_disable_by_batch_size")


def model_parameters(model_config: dict) -> dict[str, Any]:
    """Typed values of the model config's `parameters`; unknown keys are an error."""
    raw = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
    unknown = sorted(set(raw) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameters in config.pbtxt: {', '.join(unknown)} "
                         f"(known: {', '.join(PARAMETERS)})")
    out = {}
    for key, (typ, default) in PARAMETERS.items():
        text = raw.get(key, "").strip()
        if not text or text.startswith("${"):  # unset, or an unfilled template
            out[key] = default
        elif typ is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"parameter {key} must be true or false, got {text!r}")
            out[key] = text.lower() in ("true", "1", "yes")
        elif typ is int:
            try:
                out[key] = int(text)
            except ValueError:
                raise ValueError(f"parameter {key} must be an integer, got {text!r}") from None
        else:
            out[key] = text
    return out


@dataclass(slots=True)
class TritonRequest:
    prompt: str
    params: SamplingParams
    raw: bool
    stream: bool
    medusa: bool
    include_input: bool = False     # exclude_input_in_output false: the prompt starts the output


def _scalar(inputs: dict[str, np.ndarray], name: str, kind: str):
    arr = inputs.get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.size != 1:
        raise ValueError(f"input {name} must hold one value, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    if kind == "str":
        if isinstance(v, bytes):
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"input {name} is not valid UTF-8") from None
        return str(v)
    if kind == "bool":
        return bool(v)
    if kind == "int":
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"input {name} must be an integer")
        return int(v)
    return float(v)


def _strings(inputs: dict[str, np.ndarray], name: str) -> list[str]:
    if inputs.get(name) is None:
        return []
    try:
        return [w.decode("utf-8") if isinstance(w, bytes) else str(w)
                for w in np.asarray(inputs[name]).reshape(-1)]
    except UnicodeDecodeError:
        raise ValueError(f"input {name} is not valid UTF-8") from None


def parse_inputs(inputs: dict[str, np.ndarray], *, engine_mode: str,
                 default_max_tokens: int = 256, raw_default: bool = False, has_medusa: bool = False,
                 parameters: dict | None = None, tokenize=None) -> TritonRequest:
    """Validate one request's input tensors (and request parameters); ValueError names the problem.

    The generate endpoint turns JSON fields that name no input into request parameters, so an
    unknown parameter is an unknown field. Triton's own (`triton_*`) are allowed.
    """
    unknown = sorted(set(inputs) - set(INPUT_NAMES))
    if unknown:
        raise ValueError(f"unknown inputs: {', '.join(unknown)} (known: {', '.join(INPUT_NAMES)})")
    unknown = sorted(k for k in (parameters or {}) if not k.startswith("triton_"))
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(unknown)} (known inputs: {', '.join(INPUT_NAMES)})")
    prompt = _scalar(inputs, "text_input", "str")
    if prompt is None:
        raise ValueError("input text_input is required")
    for name, ok in NEUTRAL_INPUTS.items():
        v = _scalar(inputs, name, "bool" if name.startswith("return_") else "int")
        if v is not None and v not in ok:
            raise ValueError(f"input {name}={v} is not supported by apar-rt "
                             f"(supported: {', '.join(str(x).lower() for x in ok)})")
    mode = _scalar(inputs, "mode", "str") or engine_mode
    if mode not in ("apar", "ar"):
        raise ValueError(f"input mode must be 'apar' or 'ar', got {mode!r}")
    medusa = bool(_scalar(inputs, "medusa", "bool"))
    if medusa and not has_medusa:
        raise ValueError("input medusa is true, but this engine has no Medusa heads")
    top_p = _scalar(inputs, "top_p", "float")
    stop = tuple(w for w in _strings(inputs, "stop_words") if w)
    end_id = _scalar(inputs, "end_id", "int")
    if end_id is not None and end_id < -1:
        raise ValueError(f"input end_id must be a token id, or -1 to ignore EOS; got {end_id}")
    bias: dict[int, float] = {}
    words = _strings(inputs, "embedding_bias_words")
    weights = [] if inputs.get("embedding_bias_weights") is None else \
        [float(w) for w in np.asarray(inputs["embedding_bias_weights"]).reshape(-1)]
    if len(words) > MAX_LOGIT_BIAS:
        raise ValueError(f"embedding_bias_words may hold at most {MAX_LOGIT_BIAS} entries, got {len(words)}")
    if len(words) != len(weights):
        raise ValueError(f"embedding_bias_words has {len(words)} entries but embedding_bias_weights has "
                         f"{len(weights)}")
    for word, weight in zip(words, weights):
        ids = tokenize(word) if (tokenize and word) else []
        if not ids:
            raise ValueError(f"embedding_bias_words entry {word!r} has no tokens")
        for t in ids:
            bias[t] = bias.get(t, 0.0) + weight
    max_tokens = _scalar(inputs, "max_tokens", "int")
    top_k = _scalar(inputs, "top_k", "int")
    for name, v in (("max_tokens", max_tokens), ("top_k", top_k)):
        if v is not None and v < 0:
            raise ValueError(f"input {name} must be >= 0 and below 2^31, got {v} (a JSON value of 2^31 or "
                             "more wraps negative in an INT32 input)")
    seed = _scalar(inputs, "random_seed", "int")
    temperature = _scalar(inputs, "temperature", "float")
    params = SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=0.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None or top_p == 0.0 else top_p,
        top_k=top_k or 0,
        seed=seed, stop=stop, stop_token_ids=() if end_id is None or end_id < 0 else (end_id,),
        ignore_eos=end_id == -1, logit_bias=bias, mode=mode)
    raw = _scalar(inputs, "raw", "bool")
    exclude = _scalar(inputs, "exclude_input_in_output", "bool")
    return TritonRequest(prompt, params, raw_default if raw is None else raw,
                         bool(_scalar(inputs, "stream", "bool")), medusa,
                         include_input=exclude is False)


class Sender(Protocol):
    """What the model shell provides per request (wrapping its response sender)."""

    def send(self, text: str, final: bool) -> None: ...
    def error(self, message: str, internal: bool = False) -> None: ...   # sends a final error response
    def cancelled(self) -> bool: ...
    def close(self) -> None: ...                                          # a final flag, no response


class TritonServing:
    """One engine in a loop thread, serving the Triton model's requests.

    One relay thread (not one per request) sends every request's responses: the engine loop
    puts all requests' events into one queue, and the relay also polls for cancellation. A send
    that fails (the client went away) cancels the request, which frees its KV blocks.
    on_latency(metric name, seconds): each histogram observation (the model's Triton metrics).
    """

    def __init__(self, engine, *, default_max_tokens: int = 256, raw: bool = False,
                 poll_seconds: float = 0.1, on_latency=None, stream_interval: int = 1) -> None:
        self.engine = engine
        self.counts = ServingCounters(medusa=getattr(engine, "verifier", None) is not None,
                                      on_latency=on_latency)
        self.loop = EngineLoop(engine, self.counts, name="apar-triton-engine",
                               stream_interval=stream_interval).start()
        self.default_max_tokens = default_max_tokens
        self.raw = raw
        self.has_medusa = getattr(engine, "verifier", None) is not None
        self._sink: queue.SimpleQueue = queue.SimpleQueue()
        self._poll = poll_seconds
        self._closing = False
        self._relay_thread = threading.Thread(target=self._relay, name="apar-triton-relay", daemon=True)
        self._relay_thread.start()

    @classmethod
    def from_parameters(cls, params: dict[str, Any], model_dir: str | Path | None = None,
                        on_latency=None) -> "TritonServing":
        """Load the engine named by the config parameters. A relative engine_dir is taken from
        the current directory, else from the repository root holding runtime/model_repository."""
        from apar_rt.engine import Engine

        if not params["engine_dir"]:
            raise ValueError("config.pbtxt parameter engine_dir is not set")
        if params["stream_interval"] < 1:
            raise ValueError(f"config.pbtxt parameter stream_interval must be at least 1 (steps), "
                             f"got {params['stream_interval']}")
        path = Path(params["engine_dir"])
        if not path.is_absolute() and not path.exists() and model_dir is not None:
            path = Path(model_dir).resolve().parents[2] / path
        if params["torch_threads"]:
            import torch
            torch.set_num_threads(params["torch_threads"])
        backend = params["backend"]
        if not backend:   # an engine folder's manifest names its backend; a model folder runs on torch
            if (path / "manifest.json").is_file():
                from apar_rt.build.manifest import read_manifest
                backend = read_manifest(path).backend
            else:
                backend = "torch"
        kwargs = {k: params[k] for k in _ENGINE_KWARGS if params[k] is not None}
        medusa = params["medusa"]
        if medusa.lower() in ("", "false", "0", "no"):
            medusa = False
        elif medusa.lower() in ("true", "1", "yes"):
            medusa = True
        engine = Engine.from_pretrained(path, backend=backend, dtype=params["dtype"],
                                        device=params["device"] or None, medusa=medusa, **kwargs)
        return cls(engine, default_max_tokens=params["default_max_tokens"], raw=params["raw"], on_latency=on_latency,
                   stream_interval=params["stream_interval"])

    def submit(self, inputs: dict[str, np.ndarray], sender: Sender, parameters: dict | None = None) -> None:
        """Validate and queue one request; its responses go out through `sender`. Never blocks
        on the engine: a request the loop cannot take (it is down) is answered at once."""
        try:
            req = parse_inputs(inputs, engine_mode=self.engine.config.mode,
                               default_max_tokens=self.default_max_tokens, raw_default=self.raw,
                               has_medusa=self.has_medusa, parameters=parameters, tokenize=self.loop.tokenize)
            fut = self.loop.submit(req.prompt, req.params, raw=req.raw, sink=self._sink, final_only=not req.stream)
        except ValueError as e:
            _answer_error(sender, str(e))
            return
        except RuntimeError as e:     # the engine loop is down
            _answer_error(sender, str(e), internal=True)
            return
        except Exception:
            log.exception("a Triton request could not be prepared")
            _answer_error(sender, "internal error while preparing this request (details are in the "
                                  "server log)", internal=True)
            return
        self._sink.put(_New(fut, sender, req.stream, req.prompt if req.include_input else ""))

    # ---- the relay thread ----

    def _relay(self) -> None:
        live: dict[str, _Relayed] = {}          # request id -> its relay state
        early: dict[str, list] = {}             # events that came before their request's _New
        admitting: list[_New] = []              # queued, not yet admitted (or refused)
        next_poll = time.monotonic() + self._poll
        while not (self._closing and not live and not admitting):
            try:
                item = self._sink.get(timeout=self._poll)
            except queue.Empty:
                item = None
            try:
                if isinstance(item, _New):
                    admitting.append(item)
                elif item is not None:
                    r = live.get(item.request_id)
                    if r is None:
                        early.setdefault(item.request_id, []).append(item)
                    elif self._deliver(r, item):
                        del live[item.request_id]
                for new in [n for n in admitting if n.future.done()]:
                    admitting.remove(new)
                    r = self._admitted(new)
                    if r is None:
                        early.pop(getattr(new.future, "request_id", None), None)
                        continue
                    live[r.stream.request_id] = r
                    for ev in early.pop(r.stream.request_id, ()):
                        if self._deliver(r, ev):
                            del live[r.stream.request_id]
                            break
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + self._poll
                    for rid, r in list(live.items()):
                        if _safe(r.sender.cancelled):
                            r.stream.cancel()      # the loop answers with an abort event
            except Exception:   # never let one request's failure stop the relay
                log.exception("the Triton relay failed on an item")

    def _admitted(self, new: "_New") -> "_Relayed | None":
        """The relay state of an admitted request, or None after answering a refused one."""
        try:
            stream = new.future.result()
        except ValueError as e:
            _answer_error(new.sender, str(e))
            return None
        except Exception as e:
            _answer_error(new.sender, str(e) if isinstance(e, RuntimeError) else "internal error",
                          internal=True)
            return None
        return _Relayed(stream, new.sender, new.stream_mode, [new.prefix] if new.prefix else [])

    def _deliver(self, r: "_Relayed", ev) -> bool:
        """Send one event's response; True once the request is done (answered, or failed to send)."""
        try:
            if ev.finished:
                if ev.finish_reason == "error":
                    r.sender.error(ev.error or "the request failed", internal=ev.internal_error)
                elif ev.finish_reason == "abort":
                    r.sender.close()
                else:
                    text = "".join(r.parts) + ev.text
                    r.sender.send(text, final=True)
                return True
            if r.stream_mode:
                text = "".join(r.parts) + ev.text
                r.parts.clear()
                if text:
                    r.sender.send(text, final=False)
            else:
                r.parts.append(ev.text)
            return False
        except Exception:  # a failed send (e.g. the client went away): cancel, which frees its KV
            log.warning("sending a response for %s failed; cancelling it", r.stream.request_id, exc_info=True)
            r.stream.cancel()
            _safe(r.sender.close)
            return True

    def close(self) -> None:
        self.loop.close()            # fails what is still running: the relay answers those
        self._closing = True
        self._relay_thread.join(5)


@dataclass(slots=True)
class _New:
    future: Any
    sender: Sender
    stream_mode: bool
    prefix: str                       # the prompt, when the output must include it


@dataclass(slots=True)
class _Relayed:
    stream: Any                       # the RequestStream (its events arrive through the sink)
    sender: Sender
    stream_mode: bool
    parts: list[str]                  # text not sent yet


def _safe(fn) -> Any:
    try:
        return fn()
    except Exception:
        log.warning("a response-sender call failed", exc_info=True)
        return None


def _answer_error(sender: Sender, message: str, internal: bool = False) -> None:
    try:
        sender.error(message, internal=internal)
    except Exception:
        log.warning("could not send an error response", exc_info=True)
