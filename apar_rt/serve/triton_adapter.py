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

A bad request gets a Triton error (INVALID_ARG) for that request only. A cancelled request
(the client stopped its stream) is aborted and its KV blocks freed.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from apar_rt.core import SamplingParams
from apar_rt.serve.engine_loop import EngineLoop, LoopStats

log = logging.getLogger(__name__)

INPUT_NAMES = ("text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "end_id", "stop_words",
               "embedding_bias_words", "embedding_bias_weights", "random_seed", "mode", "medusa", "raw")

# config.pbtxt parameters -> (type, default)
# (None: not given; the engine's default, or an engine folder's manifest, applies)
PARAMETERS: dict[str, tuple[type, Any]] = {
    "engine_dir": (str, ""), "backend": (str, ""), "mode": (str, "apar"), "dtype": (str, "auto"),
    "device": (str, ""), "num_blocks": (int, None), "block_size": (int, None), "max_num_seqs": (int, None),
    "max_num_tokens": (int, None), "max_model_len": (int, None), "max_depth": (int, None),
    "medusa": (str, ""), "medusa_tree": (str, None), "acceptance": (str, None), "text_join": (str, None),
    "default_max_tokens": (int, 256), "raw": (bool, False), "torch_threads": (int, 0),
}
_ENGINE_KWARGS = ("mode", "num_blocks", "block_size", "max_num_seqs", "max_num_tokens", "max_model_len",
                  "max_depth", "medusa_tree", "acceptance", "text_join")


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
    seed = _scalar(inputs, "random_seed", "int")
    temperature = _scalar(inputs, "temperature", "float")
    params = SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=0.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None or top_p == 0.0 else top_p,
        top_k=_scalar(inputs, "top_k", "int") or 0,
        seed=seed, stop=stop, stop_token_ids=() if end_id is None or end_id < 0 else (end_id,),
        ignore_eos=end_id == -1, logit_bias=bias, mode=mode)
    raw = _scalar(inputs, "raw", "bool")
    return TritonRequest(prompt, params, raw_default if raw is None else raw,
                         bool(_scalar(inputs, "stream", "bool")), medusa)


class Sender(Protocol):
    """What the model shell provides per request (wrapping its response sender)."""

    def send(self, text: str, final: bool) -> None: ...
    def error(self, message: str, internal: bool = False) -> None: ...   # sends a final error response
    def cancelled(self) -> bool: ...
    def close(self) -> None: ...                                          # a final flag, no response


class _Counts:
    """A LoopObserver that counts finished requests by reason (for the model's metrics)."""

    def __init__(self) -> None:
        self.finished: Counter = Counter()
        self.stats = LoopStats()

    def on_first_token(self, seconds: float) -> None: ...
    def on_inter_token(self, seconds: float) -> None: ...

    def on_finish(self, seconds: float, reason: str, prompt_tokens: int, generated_tokens: int,
                  stats: dict | None = None) -> None:
        self.finished[reason] += 1

    def on_stats(self, stats: LoopStats) -> None:
        self.stats = stats


class TritonServing:
    """One engine in a loop thread, serving the Triton model's requests."""

    def __init__(self, engine, *, default_max_tokens: int = 256, raw: bool = False) -> None:
        self.engine = engine
        self.counts = _Counts()
        self.loop = EngineLoop(engine, self.counts, name="apar-triton-engine").start()
        self.default_max_tokens = default_max_tokens
        self.raw = raw
        self.has_medusa = getattr(engine, "verifier", None) is not None

    @classmethod
    def from_parameters(cls, params: dict[str, Any], model_dir: str | Path | None = None) -> "TritonServing":
        """Load the engine named by the config parameters. A relative engine_dir is taken from
        the current directory, else from the repository root holding runtime/model_repository."""
        from apar_rt.engine import Engine

        if not params["engine_dir"]:
            raise ValueError("config.pbtxt parameter engine_dir is not set")
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
        return cls(engine, default_max_tokens=params["default_max_tokens"], raw=params["raw"])

    def _tokenize(self, word: str) -> list[int]:
        # in the engine's thread: the tokenizer is not safe to share across threads
        return self.loop.call(lambda e: list(e.tokenizer(word, add_special_tokens=False).input_ids))

    def submit(self, inputs: dict[str, np.ndarray], sender: Sender, parameters: dict | None = None) -> None:
        """Validate and queue one request; its responses go out through `sender`."""
        try:
            req = parse_inputs(inputs, engine_mode=self.engine.config.mode,
                               default_max_tokens=self.default_max_tokens, raw_default=self.raw,
                               has_medusa=self.has_medusa, parameters=parameters, tokenize=self._tokenize)
            fut = self.loop.submit(req.prompt, req.params, raw=req.raw)
        except ValueError as e:
            sender.error(str(e))
            return
        except RuntimeError as e:
            sender.error(str(e), internal=True)
            return
        threading.Thread(target=self._relay, args=(fut, sender, req.stream), daemon=True,
                         name="apar-triton-relay").start()

    def _relay(self, fut, sender: Sender, stream_mode: bool) -> None:
        try:
            try:
                stream = fut.result()
            except ValueError as e:
                sender.error(str(e))
                return
            except RuntimeError as e:
                sender.error(str(e), internal=True)
                return
            parts: list[str] = []
            while True:
                ev = stream.get(timeout=0.1)
                if sender.cancelled():
                    stream.cancel()
                if ev is None:
                    continue
                if ev.finished:
                    if ev.finish_reason == "error":
                        sender.error(ev.error or "the request failed", internal=ev.internal_error)
                    elif ev.finish_reason == "abort":
                        sender.close()
                    else:
                        sender.send(ev.text if stream_mode else "".join(parts) + ev.text, final=True)
                    return
                if stream_mode:
                    if ev.text:
                        sender.send(ev.text, final=False)
                else:
                    parts.append(ev.text)
        except Exception:  # a failure to send (e.g. the client went away) ends only this request
            log.exception("relaying a response failed")
            try:
                sender.close()
            except Exception:
                pass

    def close(self) -> None:
        self.loop.close()
