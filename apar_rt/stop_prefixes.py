"""How much of a running branch's text a stream holds back for its stop strings.

A stop string cuts a branch's text where it begins, in the step whose token wrote its last
character (`Scheduler._hit_stop_string`). Text a stop string may still cut must therefore not be
streamed yet, and that is exactly the longest end of the text that is a proper prefix of one of
the stop strings: a stop string that begins earlier has either completed (and cut) already or
can never complete. So a stream holds back that partial match and nothing else. (vLLM holds
back max(len(stop)) - 1 characters whatever the text; the final text is the same, this one just
sends text as soon as no stop string can cut it.)

Pure Python; the text contract (`apar.settled_text`) and the servers' streamer share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopPrefixes:
    """`held(text)`: the length of the longest end of `text` that is a proper prefix of one of
    `stops` (0 with no stop strings). The proper prefixes are indexed by their last character, so
    a text that ends in none of them costs one lookup.

    `quiet[t]` (grown by `quiet_table`) remembers, per token id, whether the token's text `text`
    (one that leaves the text whole: `ByteTable.whole_text`) is quiet (1) or not (2; 0: not judged
    yet, `judge`): appended to text of which nothing is held, a quiet text leaves nothing held,
    because it holds no stop string's first character (a partial match begins with one), and
    ends whole (not in an invalid byte's U+FFFD, which a stream also holds while it is last).
    A token id's text must be the same for every caller: keep one StopPrefixes per tokenizer."""

    __slots__ = ("_by_last", "_firsts", "longest", "quiet", "stops")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=1) - 1   # the longest proper prefix
        by_last: dict[str, set[str]] = {}
        for s in self.stops:
            for k in range(1, len(s)):
                by_last.setdefault(s[k - 1], set()).add(s[:k])
        self._by_last = {c: sorted(ps, key=len, reverse=True) for c, ps in by_last.items()}
        self._firsts = frozenset(s[0] for s in self.stops if len(s) > 1)
        self.quiet = bytearray()

    def held(self, text: str) -> int:
        if text:
            for p in self._by_last.get(text[-1], ()):
                if text.endswith(p):
                    return len(p)
        return 0

    def held_before(self, end: int, text_slice: Callable[[int, int], str]) -> int:
        """`held` of a text's first `end` characters, reading only the end a partial match can
        span (`text_slice(a, b)` gives characters a..b of the text)."""
        longest = self.longest
        return self.held(text_slice(max(0, end - longest), end)) if longest else 0

    def quiet_table(self, n: int) -> bytearray:
        """`quiet`, at least `n` entries long (for token ids below n)."""
        if len(self.quiet) < n:
            self.quiet.extend(bytes(n - len(self.quiet)))
        return self.quiet

    def judge(self, token: int, text: str) -> bool:
        """Whether token `token`, whose whole text is `text` (not empty), is quiet; remembered in
        `quiet` (which must be long enough: `quiet_table`)."""
        q = text[-1] != "\ufffd" and self._firsts.isdisjoint(text)
        self.quiet[token] = 1 if q else 2
        return q
