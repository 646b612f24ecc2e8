"""Which new tokens could complete a stop string: a filter in front of the stop-string check.

A stop string first appears in a branch's text with the token that wrote its last character.
The scheduler's check (`Scheduler._hit_stop_string`: an incremental decode of the branch and a
search of its new tail) is therefore needed only after a token that could have written that
character; after any other token it waits, and the next check decodes the tokens it skipped
together (`SegmentText.advance` takes any number of new tokens).

Whether a token could write a character is read from its text alone, `decode([token])`. That is
sound for decoders whose output for a token is the same characters in every context, except for

- whitespace: Metaspace, WordPiece, BPE suffixes and Strip add or drop spaces around a token
  depending on its neighbours, and clean-up rules drop spaces; so a stop string that ends in
  whitespace is checked after every token;
- a character whose UTF-8 bytes span tokens (byte-level BPE, byte fallback): a token that holds
  only some of its bytes decodes alone to U+FFFD, and in context it may complete a character that
  began before it. That character is not ASCII (UTF-8 never puts an ASCII byte inside another
  character), so such a token is checked when a stop string ends in a non-ASCII character, and
  otherwise only for the ASCII characters of its own text, which are the same in any context.
  (Every token is checked when a stop string ends in U+FFFD.) Random tokens of a byte-level
  vocabulary are an eighth lone bytes; text in a non-Latin script is mostly such tokens.

`decoder_is_local` accepts exactly the decoder pipelines (tokenizer.json's "decoder") made of
such steps; for any other pipeline (a Replace or a regex that acts across fused tokens, a Strip of
other characters, an unknown step) the engine builds no filter and checks after every token.

Pure Python; used in the engine's thread only.
"""

from __future__ import annotations

from typing import Callable, Sequence

from apar_rt.detokenizer import REPLACEMENT
from apar_rt.model.tokenizer import decoder_steps

# decoder steps that map each token to the same characters in any context (up to whitespace and
# split UTF-8), whether they act on tokens or on the fused text
_LOCAL_ANYWHERE = {"ByteLevel", "WordPiece", "Metaspace", "BPEDecoder", "Fuse"}
# steps that are local while they act on single tokens (before a Fuse), not on the fused text
_LOCAL_PER_TOKEN = {"ByteFallback", "Replace"}


def decoder_is_local(spec: dict | None) -> bool:
    """Whether a tokenizer.json "decoder" pipeline keeps each token's characters in every context,
    up to whitespace and U+FFFD (see the module docstring). None (no decoder: tokens joined as
    they are) is local."""
    fused = False
    for step in decoder_steps(spec):
        kind = step.get("type")
        if kind == "Fuse":
            fused = True
        if kind in _LOCAL_ANYWHERE:
            continue
        if kind == "Strip" and str(step.get("content", "")).isspace():
            continue
        if kind in _LOCAL_PER_TOKEN and not fused:
            continue
        if kind == "Replace" and len(step.get("pattern", {}).get("String") or "") == 1:
            continue   # one character for another: context-free even on the fused text
        return False
    return True


def _last_chars(stops: tuple[str, ...]) -> frozenset[str] | None:
    """The stop strings' last characters; None when one of them ends in whitespace or U+FFFD
    (every token must be checked)."""
    ends = frozenset(s[-1] for s in stops)
    if any(c.isspace() or c == REPLACEMENT for c in ends):
        return None
    return ends


_UNSEEN = object()


class StopFilter:
    """`may_complete(token, stops)` is False only if `token` cannot have completed any of `stops`.

    `decode` renders token ids as the stop-string text does (special tokens skipped); it must
    belong to a tokenizer whose decoder `decoder_is_local`. Memory is bounded by the vocabulary
    (each token's characters, decoded once on first sight) plus MAX_STOP_SETS stop-string tuples'
    last characters and MAX_VERDICT_SETS tuples' verdicts (a byte per token id), whatever stop
    strings the requests bring. A verdict, once worked out, is read back without decoding or set
    arithmetic (the check runs after every token of every request that has stop strings).
    """

    __slots__ = ("_decode", "_chars", "_ends", "_verdicts")

    MAX_STOP_SETS = 1024   # distinct stop-string tuples whose last characters are kept (then forgotten)
    MAX_VERDICT_SETS = 64  # stop-string tuples with a verdict per token (a byte each, up to the largest id seen)

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        # token -> (the characters of its text but U+FFFD, whether it holds part of a character)
        self._chars: dict[int, tuple[frozenset[str], bool]] = {}
        # stop strings -> (their last characters, whether one is not ASCII); None: check every token
        self._ends: dict[tuple[str, ...], tuple[frozenset[str], bool] | None] = {}
        # stop strings -> the verdict of each token judged so far (0: not yet, 1: cannot, 2: may complete)
        self._verdicts: dict[tuple[str, ...], bytearray] = {}

    def may_complete(self, token: int, stops: tuple[str, ...]) -> bool:
        known = self._verdicts.get(stops)
        if known is not None and token < len(known):
            v = known[token]
            if v:
                return v == 2
        return self._judge(token, stops)

    def verdicts(self, stops: tuple[str, ...]) -> bytearray:
        """The verdicts of `stops`, one byte per token id: 1 when the token cannot complete any of
        them, 2 when it may; 0 or past the end when `may_complete` has not judged it yet. The
        table is filled in place, so a caller may keep it and read it instead of asking (a verdict
        never changes; a table forgotten past MAX_VERDICT_SETS is only no longer filled)."""
        known = self._verdicts.get(stops)
        if known is None:
            if len(self._verdicts) >= self.MAX_VERDICT_SETS:
                self._verdicts.clear()
            known = self._verdicts[stops] = bytearray()
        return known

    def _judge(self, token: int, stops: tuple[str, ...]) -> bool:
        """`may_complete` worked out from the token's characters, and remembered."""
        ends = self._ends.get(stops, _UNSEEN)
        if ends is _UNSEEN:
            if len(self._ends) >= self.MAX_STOP_SETS:
                self._ends.clear()
            last = _last_chars(stops)
            ends = self._ends[stops] = None if last is None else (last, not all(c.isascii() for c in last))
        if ends is None:
            return True
        chars = self._chars.get(token)
        if chars is None:
            text = self._decode([token])
            chars = self._chars[token] = (frozenset(text) - {REPLACEMENT}, REPLACEMENT in text)
        # a token holding part of a character may complete a non-ASCII one begun before it
        verdict = bool((chars[1] and ends[1]) or not ends[0].isdisjoint(chars[0]))
        known = self.verdicts(stops)
        if token >= len(known):
            known.extend(bytes(token + 1 - len(known)))
        known[token] = 2 if verdict else 1
        return verdict


def for_tokenizer(tokenizer, decode: Callable[[Sequence[int]], str]) -> StopFilter | None:
    """A StopFilter for `tokenizer` if its decoder pipeline is known to be local, else None.

    The pipeline is read from the tokenizer's `decoder_spec()` (apar-rt's FastTokenizer); a
    tokenizer without one gets no filter."""
    spec_of = getattr(tokenizer, "decoder_spec", None)
    if spec_of is None:
        return None
    try:
        spec = spec_of()
    except Exception:   # an unreadable pipeline: check after every token
        return None
    return StopFilter(decode) if decoder_is_local(spec) else None
