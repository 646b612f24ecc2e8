"""Tokenizer loading, control-token discovery and prompt templating.

A folder with a `tokenizer.json` (every engine folder, and most Hugging Face checkpoints) is read by
the `tokenizers` library alone: no torch, no transformers, a fraction of a second. Its special
tokens and chat template come from `tokenizer_config.json` (and `chat_template.jinja`), and the
template is rendered in jinja2's immutable sandbox, as transformers does. A folder without
`tokenizer.json` (a sentencepiece-only checkpoint) falls back to transformers' AutoTokenizer, which
converts it; `apar-rt build` then writes the converted `tokenizer.json` into the engine folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Iterable

from apar_rt.apar import CHILD_TOKEN, FORK_TOKEN, ControlTokens
from apar_rt.config import ModelLoadError

VICUNA_V1_1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
# the files `FastTokenizer.save_pretrained` copies (those present)
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_JINJA)
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
_NO_LIMIT = 1 << 62


def vicuna_v1_1_prompt(user: str, system: str = VICUNA_V1_1_SYSTEM) -> str:
    """The Vicuna v1.1 conversation template, for one user turn awaiting the assistant."""
    return f"{system} USER: {user} ASSISTANT:"


class Encoding:
    """What calling a tokenizer returns (the part of transformers' BatchEncoding we use)."""

    __slots__ = ("input_ids",)

    def __init__(self, input_ids: list[int]) -> None:
        self.input_ids = input_ids


class FastTokenizer:
    """A `tokenizer.json` folder read with the `tokenizers` library.

    Offers the subset of transformers' tokenizer interface the engine, servers and tools use:
    `tok(text, add_special_tokens=True).input_ids`, `decode`, `get_vocab`, `convert_tokens_to_ids`,
    the named special tokens and their ids, `all_special_ids`, `chat_template`,
    `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` and
    `save_pretrained`. Not thread-safe for concurrent calls (as transformers' fast tokenizers).
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path / TOKENIZER_JSON))
        cfg = _read_json(self.path / TOKENIZER_CONFIG)
        special_map = _read_json(self.path / SPECIAL_TOKENS_MAP)
        self.init_kwargs = cfg
        for name in _NAMED_SPECIAL:
            setattr(self, name, _token_text(cfg.get(name, special_map.get(name))))
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.model_max_length = cfg.get("model_max_length")
        self.chat_template = _chat_template(self.path, cfg)
        extra = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens",
                                                        special_map.get("additional_special_tokens", [])))
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra or [])
        vocab = self._tok.get_vocab(with_added_tokens=True)
        named = [getattr(self, n) for n in _NAMED_SPECIAL] + [_token_text(t) for t in extra]
        ids = {vocab[t] for t in named if t is not None and t in vocab}
        ids |= {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.all_special_ids = sorted(ids)

    # ---- transformers-style interface ------------------------------------------------------

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self.encode(text, add_special_tokens=add_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        try:   # the engine's lists of Python ints go straight in (this runs per branch per step)
            text = self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)
        except TypeError:   # numpy ints, arrays, tuples
            text = self._tok.decode(list(map(int, token_ids)), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def decoder_spec(self) -> dict | None:
        """tokenizer.json's "decoder" pipeline (None: tokens are joined as they are)."""
        dec = self._tok.decoder
        return None if dec is None else json.loads(dec.__getstate__())

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decoder_tokens(self) -> list[str | None]:
        """Each id's token string as the decoder pipeline receives it; None for the ids that
        `decode(..., skip_special_tokens=True)` drops (special added tokens, unused ids)."""
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return [None if i in special else self._tok.id_to_token(i) for i in range(len(self))]

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True, **kwargs):
        """Render the chat template in jinja2's immutable sandbox; `tokenize=True` returns ids."""
        if not self.chat_template:
            raise ValueError(f"{str(self.path)!r} has no chat template")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **{n: getattr(self, n) for n in _NAMED_SPECIAL}, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, path: str | Path) -> None:
        """Copy the tokenizer files into `path` (an engine folder)."""
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, Path(path) / name)


def decoder_steps(spec: dict | None) -> list[dict]:
    """The steps of a tokenizer.json "decoder" pipeline (`FastTokenizer.decoder_spec()`): a
    Sequence's decoders in order, a lone decoder as one step, none without a decoder."""
    if spec is None:
        return []
    return list(spec.get("decoders", [])) if spec.get("type") == "Sequence" else [spec]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {str(path)!r}: {e}") from None


def _token_text(tok) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _chat_template(path: Path, cfg: dict) -> str | None:
    """The folder's default chat template: chat_template.jinja, else tokenizer_config.json's."""
    if (path / CHAT_TEMPLATE_JINJA).is_file():
        return (path / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8")
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):   # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        return named.get("default")
    return tpl if isinstance(tpl, str) else None


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (for tokenizers configured with it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


_TEMPLATES: dict[str, object] = {}


def render_chat_template(template: str, messages: list[dict], **variables) -> str:
    """Render a chat template as transformers does: jinja2's ImmutableSandboxedEnvironment (a
    template from a model folder is untrusted), trim_blocks and lstrip_blocks, and the helpers
    templates use (raise_exception, a tojson that keeps non-ASCII, strftime_now)."""
    compiled = _TEMPLATES.get(template)
    if compiled is None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
            raise ModelLoadError(f"chat templates need jinja2>=3.1.6 (sandbox fixes); found {jinja2.__version__}")

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        compiled = _TEMPLATES[template] = env.from_string(template)
    return compiled.render(messages=messages, **variables)


def load_tokenizer(path: str | Path, only: Iterable[str] | None = None):
    """The tokenizer of a model or engine folder: `FastTokenizer` when it has tokenizer.json,
    else transformers' AutoTokenizer. No code from the folder ever runs: a tokenizer that needs
    custom code (`auto_map`) is refused with ModelLoadError, never prompted for.

    only: read just these files of the folder (an engine folder's recorded files); the others
    are ignored.
    """
    if only is None:
        return _load_tokenizer(Path(path), Path(path))
    with tempfile.TemporaryDirectory(prefix="apar-tokenizer-") as tmp:
        for name in only:
            src = Path(path, name)
            if "/" not in name and "\\" not in name and src.is_file():
                os.symlink(src.resolve(), Path(tmp, name))
        tok = _load_tokenizer(Path(tmp), Path(path))
        if isinstance(tok, FastTokenizer):   # it read everything it needs; files are copied from the folder
            tok.path = Path(path)
        return tok


def _custom_code_error(shown: Path) -> ModelLoadError:
    return ModelLoadError(f"the tokenizer of {str(shown)!r} needs custom code from the folder (auto_map); "
                          "apar-rt never runs code from a model folder: use a built-in tokenizer class "
                          "(tokenizer_class in tokenizer_config.json)")


def _load_tokenizer(folder: Path, shown: Path):
    if "AutoTokenizer" in (_read_json(folder / TOKENIZER_CONFIG).get("auto_map") or {}):
        raise _custom_code_error(shown)
    try:
        if (folder / TOKENIZER_JSON).is_file():
            return FastTokenizer(folder)
    except ModelLoadError:
        raise
    except Exception as e:  # tokenizers raises its own exception types for a bad file
        raise ModelLoadError(f"cannot load a tokenizer from {str(shown)!r}: {e}") from None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelLoadError(f"{str(shown)!r} has no {TOKENIZER_JSON}; reading its tokenizer needs the "
                             "'transformers' package") from None
    try:
        # the engine rejects over-long prompts itself: no "indexing errors" warning from transformers
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, model_max_length=_NO_LIMIT)
    except Exception as e:  # transformers raises many types for a bad folder
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise _custom_code_error(shown) from None
        raise ModelLoadError(f"cannot load a tokenizer from {str(shown)!r}: {e}") from None


def control_tokens(tokenizer, fork_id: int | None = None, child_id: int | None = None) -> ControlTokens:
    """[Fork]/[Child] ids: given explicitly, else found by name in the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    fork = fork_id if fork_id is not None else vocab.get(FORK_TOKEN)
    child = child_id if child_id is not None else vocab.get(CHILD_TOKEN)
    if fork is None or child is None:
        return ControlTokens(None, None)
    return ControlTokens(fork, child)


def encode_prompt(tokenizer, prompt: str, *, raw: bool = False) -> list[int]:
    """Token ids for a user prompt: the checkpoint's chat template, else Vicuna v1.1; raw skips both."""
    if raw:
        return list(tokenizer(prompt).input_ids)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(vicuna_v1_1_prompt(prompt)).input_ids)
