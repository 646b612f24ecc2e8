"""`decode(ids, skip_special_tokens=True)` of a byte-level BPE tokenizer as a table lookup.

A byte-level BPE decoder (GPT-2, Llama 3, Qwen, the demo model) maps each token to fixed bytes
and reads the joined bytes as UTF-8, an invalid sequence becoming U+FFFD. So the text of any
token ids is `b"".join(table[i] for i in ids).decode("utf-8", "replace")`, which costs about
a third of a call into the tokenizer (1.0 against 2.6 us for nine tokens). The engine decodes a
few tokens per branch per step (incremental text, stop strings, streaming), so this is its
hottest call at scale.

The same fact makes incremental text cheap: a segment's text is its tokens' bytes read as UTF-8
whatever came before them (UTF-8 restarts at every character), so each new token's bytes are
decoded once (`detokenizer.ByteSegmentText`).

`byte_table(tokenizer, vocab_size)` builds the table from the vocabulary only for tokenizers whose
decoder pipeline is ByteLevel alone with no clean-up rule, and returns it only after it gave the
tokenizer's own `decode` on every single id below `vocab_size` (ids past the tokenizer's
vocabulary, as a padded embedding has, decode to nothing) and on random sequences rich in partial
UTF-8 characters; otherwise None, and the engine calls the tokenizer. Pure Python.
"""

from __future__ import annotations

import codecs
import random
from typing import Callable, Sequence

from apar_rt.model.tokenizer import decoder_steps

Decoder = Callable[[Sequence[int]], str]

CHECK_SEQUENCES = 2000   # random sequences the table must decode as the tokenizer does


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable stand-in character of each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _token_bytes(token: str, byte_of: dict[str, int]) -> bytes:
    """A token's bytes as the ByteLevel decoder gives them: its characters mapped back to bytes,
    or, when one of them has no byte (an added token written in plain text), its UTF-8."""
    try:
        return bytes([byte_of[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


class ByteTable:
    """Each token id's bytes (`token_bytes[i]`; b"" for ids the decode skips), the text of those
    whose bytes read as UTF-8 hold nothing back (`whole_text[i]`: ASCII, whole characters, and
    bytes that can start no character, each read as U+FFFD), else None (a piece of a character,
    whose text depends on the bytes after it), and `decode`. After whole text, a token with a
    `whole_text` adds exactly that text and leaves the text whole: UTF-8 restarts at every
    character."""

    __slots__ = ("token_bytes", "whole_text", "_slow")

    def __init__(self, token_bytes: list[bytes], slow: Decoder) -> None:
        self.token_bytes = token_bytes
        self.whole_text: list[str | None] = [_whole_text(t) for t in token_bytes]
        self._slow = slow

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's `decode(ids, skip_special_tokens=True)`; ids outside the table go to
        the tokenizer itself."""
        try:
            return b"".join([self.token_bytes[i] for i in ids]).decode("utf-8", "replace")
        except (IndexError, TypeError):
            return self._slow(ids)


def byte_table(tokenizer, vocab_size: int | None = None, seed: int = 0) -> ByteTable | None:
    """The byte table of `tokenizer` for ids below max(vocab_size, its vocabulary), or None when
    the tokenizer is not byte-level BPE or the table fails the check (see the module docstring)."""
    spec_of = getattr(tokenizer, "decoder_spec", None)
    tokens_of = getattr(tokenizer, "decoder_tokens", None)
    if spec_of is None or tokens_of is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        steps = decoder_steps(spec_of())
        if len(steps) != 1 or steps[0].get("type") != "ByteLevel":
            return None
        byte_of = _byte_of_char()
        table = [b"" if t is None else _token_bytes(t, byte_of) for t in tokens_of()]
    except Exception:   # an unexpected tokenizer object: keep its own decode
        return None
    table += [b""] * max(0, (vocab_size or 0) - len(table))

    def slow(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    bt = ByteTable(table, slow)
    try:
        return bt if _agrees(bt.decode, slow, table, seed) else None
    except Exception:   # the tokenizer refused ids past its vocabulary
        return None


def _agrees(fast: Decoder, slow: Decoder, table: list[bytes], seed: int) -> bool:
    """Every single token, then random sequences half made of tokens that are not whole UTF-8
    on their own (pieces of characters), decode alike."""
    n = len(table)
    if any(fast([i]) != slow([i]) for i in range(n)):
        return False
    partial = [i for i, b in enumerate(table) if b and not _whole(b)] or list(range(n))
    rng = random.Random(seed)
    for _ in range(CHECK_SEQUENCES):
        ids = [rng.choice(partial) if rng.random() < 0.5 else rng.randrange(n) for _ in range(rng.randint(2, 12))]
        if fast(ids) != slow(ids):
            return False
    return True


def _whole_text(b: bytes) -> str | None:
    """b's text when an incremental UTF-8 decoder (errors "replace") holds none of its bytes back."""
    text, used = codecs.utf_8_decode(b, "replace", False)
    return text if used == len(b) else None


def _whole(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
