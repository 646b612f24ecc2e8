"""Incremental detokenization of APAR branches: each branch's text, grown with its tokens.

The text contract is `apar.recover_text`'s: a branch's own text is split into segments after
each [Fork] that spawned a child, and each segment is the `apar.continuation_text` of its tokens
in their context. `SegmentText` keeps one segment's text as tokens arrive at a cost set by the
new tokens, not by the segment's length (vLLM's `detokenize_incrementally`, HF's TextStreamer):
it decodes the new tokens with a few tokens of left context (a prefix offset), keeps what they
add, and holds back a trailing incomplete character (U+FFFD) until more bytes arrive.

That is exact for decoders whose output for a token depends only on a few tokens before it
(byte-level BPE, sentencepiece with byte fallback, WordPiece, the demo tokenizer). Where a
decoder is not (a byte-fallback run that turns invalid, a clean-up rule across tokens), the
decoded left context stops matching what was kept, and the segment is decoded again in full;
tokenizers with `clean_up_tokenization_spaces` (a rule that can reach further back than that
check) are decoded in full every time (`TreeText(..., incremental=False)`). So a segment's text
is always exactly `continuation_text(decode, context, tokens)`.

`TreeText` holds the segments of every branch of one request and hands their text to
`apar.recover_text` / `apar.settled_text` (`TreeText.segment`), so the final text is rendered
by the one walk that defines it, from text already decoded.

Pure Python; used in the engine's thread only.
"""

from __future__ import annotations

from codecs import utf_8_decode as _utf8_decode
from typing import Sequence

from apar_rt.apar import Decoder, branch_window, windowed_text
from apar_rt.core import Branch

REPLACEMENT = "\ufffd"
REBASE = 8   # tokens of left context decoded with the new ones before the prefix offset moves up
MAX_CHAR_TOKENS = 4   # a character's UTF-8 bytes span at most this many tokens


class SegmentText:
    """The text of token_ids[start:end] of one branch, for a growing `end`.

    Invariant: `text()` == apar.continuation_text(decode, context[:start], token_ids[start:end]).
    The text is `committed` pieces (final) plus `pending` (the newest tokens' text while it ends
    in U+FFFD). `version` changes whenever text already returned may have changed (a full
    re-decode); readers that emitted part of it compare versions.
    """

    append_only = False   # True: committed text never changes, it only grows (ByteSegmentText)

    __slots__ = ("_decode", "_tokens", "start", "end", "_window", "_head", "_parts", "committed_len",
                 "pending", "_p", "_r", "_prefix", "_marks", "version", "incremental", "decoded_tokens")

    def __init__(self, decode: Decoder, tokens: list[int], start: int, window: list[int],
                 incremental: bool = True) -> None:
        self._decode = decode
        self._tokens = tokens            # the branch's token_ids (grows in place)
        self.start = start
        self.end = start
        self._window = window            # context tokens decoded before the first token
        self._head: str | None = None    # decode(window)
        self._parts: list[str] = []      # committed text, in pieces
        self.committed_len = 0
        self.pending = ""                # text of tokens after the read offset (ends in U+FFFD)
        self._p = 0                      # prefix offset (relative to start): left context begins here
        self._r: int | None = None       # read offset: tokens whose text is committed; None: none yet
        self._prefix: str | None = ""    # decode(tokens[start+p : start+r]); None: not yet decoded
        self._marks: list[tuple[int, int]] = []   # read offsets taken (token offset, committed length)
        self.version = 0
        self.incremental = incremental
        self.decoded_tokens = 0          # tokens passed to decode (for tests of the cost)

    def __len__(self) -> int:
        return self.committed_len + len(self.pending)

    def _dec(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self._decode(ids)

    def whole_texts(self) -> list[str | None] | None:
        """Per token id, the text a token adds that leaves the text whole (`ByteSegmentText`,
        while nothing is held); None here."""
        return None

    def advance(self, end: int) -> None:
        """Take the branch's tokens up to index `end` (exclusive)."""
        if end <= self.end:
            return
        self.end = end
        if self._r is None or not self.incremental:
            self._decode_all()
            return
        s = self.start
        if self._prefix is None:
            self._prefix = self._dec(self._tokens[s + self._p:s + self._r])
        new = self._dec(self._tokens[s + self._p:end])
        if not new.startswith(self._prefix):   # the left context decodes differently now
            if not self._back_off(end):
                self._decode_all()
            return
        pending = new[len(self._prefix):]
        if pending and pending[-1] != REPLACEMENT:
            self._commit(pending, end - s, new)
        else:
            self.pending = pending
            if end - s - self._r > 2 * REBASE:
                # a reader that advances only after tokens holding part of a character (the stop
                # filter's checks) must not decode an ever longer uncommitted tail
                found = self._last_whole(lambda r: self._dec(self._tokens[s + self._p:s + r]), end - s,
                                         self._r, self._prefix, new)
                if found is not None:
                    read, head = found
                    self._commit(head[len(self._prefix):], read, head)
                    self.pending = new[len(head):]

    @staticmethod
    def _last_whole(text_upto, end: int, low: int, base: str, full: str) -> tuple[int, str] | None:
        """The text ends in an incomplete character at token offset `end`: the last offset r in
        end - MAX_CHAR_TOKENS .. end - 1 (r > low) where `text_upto(r)` ends whole, longer than
        `base` and a prefix of `full` (the text at `end`), with that text; None if there is none.
        At most MAX_CHAR_TOKENS decodes."""
        for r in range(end - 1, max(low, end - MAX_CHAR_TOKENS - 1), -1):
            head = text_upto(r)
            if not (head.startswith(base) and full.startswith(head)):
                return None
            if len(head) > len(base) and head[-1] != REPLACEMENT:
                return r, head
        return None

    def _commit(self, piece: str, read: int, decoded: str) -> None:
        self._parts.append(piece)
        self.committed_len += len(piece)
        self.pending = ""
        if read - self._p > REBASE:   # keep the decoded window short: left context from the last read offset
            self._p = self._r
            self._prefix = self._dec(self._tokens[self.start + self._p:self.start + read])
        else:
            self._prefix = decoded
        self._r = read
        self._marks.append((read, self.committed_len))

    def _back_off(self, end: int) -> bool:
        """Decode again from an earlier read offset, with its own left context, doubling the
        distance until the left context decodes as kept (a byte-fallback run that turned invalid
        reaches back to the run's start only). False: none left, decode the whole segment."""
        marks, s, rel = self._marks, self.start, end - self.start
        dist = 2 * (rel - self._p)
        j = len(marks) - 1
        while True:
            while j >= 1 and rel - marks[j - 1][0] < dist:
                j -= 1
            if j < 1:
                return False
            left, (read, length) = marks[j - 1][0], marks[j]
            prefix = self._dec(self._tokens[s + left:s + read])
            new = self._dec(self._tokens[s + left:end])
            if new.startswith(prefix):
                old = self.text()
                old_stable = old[:self.stable_len()]
                kept, pending = old[:length], new[len(prefix):]
                if not (kept + pending).startswith(old_stable):
                    self.version += 1
                self._parts, self.committed_len, self.pending = [kept], length, pending
                del marks[j + 1:]
                self._p, self._r, self._prefix = left, read, prefix
                if pending and pending[-1] != REPLACEMENT:
                    self._commit(pending, rel, new)
                return True
            dist *= 2

    def _decode_all(self) -> None:
        """The exact text from scratch (the first tokens, or after the decoder proved non-local)."""
        old_stable = self.text().rstrip(REPLACEMENT)
        seg = self._tokens[self.start:self.end]
        again = self._head is not None   # decoded before: more tokens are coming
        if self._head is None:
            self._head = self._dec(self._window) if self._window else ""
        raw = self._windowed(seg)
        if not raw.startswith(old_stable):
            self.version += 1
        self._parts = []
        self._marks = []
        self.committed_len = 0
        self._p, self._r, self.pending = 0, None, raw
        if not (raw and self.incremental):
            return
        read, kept = len(seg), raw
        if raw[-1] == REPLACEMENT:
            # A trailing incomplete character holds back only its own tokens: on a decode after the
            # first (so that a growing segment is not decoded in full again and again), commit up to
            # the last token boundary where the text ends whole.
            found = again and self._last_whole(lambda r: self._windowed(seg[:r]), len(seg), 0, "", raw)
            if not found:
                return
            read, kept = found
        self._parts.append(kept)
        self.committed_len = len(kept)
        self.pending = raw[len(kept):]
        self._r = read
        self._marks.append((read, len(kept)))
        self._prefix = None              # decoded when the next token comes

    def _windowed(self, tokens: list[int]) -> str:
        """The text `tokens` (the segment's first ones) add after the window, counted as decoded."""
        self.decoded_tokens += len(self._window) + len(tokens)
        return windowed_text(self._decode, self._window, tokens, self._head)

    def text(self) -> str:
        """The whole text (joins the committed pieces once)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return (self._parts[0] if self._parts else "") + self.pending

    def slice(self, a: int, b: int) -> str:
        """text()[a:b] for 0 <= a <= b <= len(self), joining only the pieces it covers."""
        if a >= b:
            return ""
        c = self.committed_len
        if a >= c:
            return self.pending[a - c:b - c]
        parts = self._parts
        i, pos = len(parts), c
        while pos > a:
            i -= 1
            pos -= len(parts[i])
        head = "".join(parts[i:]) if i < len(parts) - 1 else parts[i]
        if b <= c:
            return head[a - pos:b - pos]
        return head[a - pos:] + self.pending[:b - c]

    def stable_len(self) -> int:
        """Length of the text without its trailing U+FFFD (an incomplete character)."""
        p = self.pending
        if not p:
            return self.committed_len
        return self.committed_len + len(p.rstrip(REPLACEMENT))


class ByteSegmentText(SegmentText):
    """A SegmentText for a byte-level BPE tokenizer with a byte table (`model/byte_table.ByteTable`).

    Such a decoder reads the joined bytes as UTF-8, so the text of a segment is its tokens' bytes
    decoded once each, by an incremental UTF-8 decoder that holds back an incomplete last
    character (`pending` is what those held bytes read as now: U+FFFD). Only the window matters,
    and only through the incomplete character it may end with (its held bytes, H):
    `continuation_text` is then lossy(H + T) less its first U+FFFD (the one decode(window) ended
    with) when lossy(H + T) starts with one, else lossy(T) alone. So the segment starts by
    decoding H + T until its first character comes out, and settles which case it is in then.
    The text never changes once returned (`version` stays 0). Same invariant and interface as
    SegmentText."""

    append_only = True

    __slots__ = ("_bytes", "_whole", "_held", "_lead")

    def __init__(self, table, tokens: list[int], start: int, window: list[int]) -> None:
        super().__init__(None, tokens, start, [])
        token_bytes = self._bytes = table.token_bytes
        self._whole = table.whole_text
        # the UTF-8 decoder's state: the bytes of an incomplete last character, held for the next
        data = b"".join([token_bytes[t] for t in window])
        self._held = data[_utf8_decode(data, "replace", False)[1]:]
        self._lead: bytes | None = None
        if self._held:   # the window ends in an incomplete character: the tokens' bytes go after it until it settles
            self._lead = b""

    def whole_texts(self) -> list[str | None] | None:
        """While the text so far is whole (no bytes held for an incomplete character), the byte
        table's `whole_text`: each next token t with a text `whole_texts()[t]` (not None) then adds
        exactly that text to the committed text and leaves nothing held, so a reader may take a
        run of such tokens without the segment and `advance` over them later gives the same text.
        None while bytes are held."""
        return self._whole if not self._held and self._lead is None else None

    def advance(self, end: int) -> str:
        """Take the branch's tokens up to index `end` (exclusive); returns the text appended to the
        committed text, which only grows (`append_only`), so that is all of its change. It may end
        in U+FFFD, an invalid byte's, which `stable_len` holds back while last. `pending`, the
        held bytes' U+FFFD, is not committed."""
        start = self.end
        if end <= start:
            return ""
        self.end = end
        self.decoded_tokens += end - start
        tokens = self._tokens
        if end == start + 1:
            whole = self.whole_texts()
            if whole is not None:
                # after whole text, a token of whole text needs no decode: the UTF-8 decoder holds
                # nothing before it and would hold nothing after it
                text = whole[tokens[start]]
                if text is not None:
                    if text:
                        self._parts.append(text)
                        self.committed_len += len(text)
                    return text
            data = self._bytes[tokens[start]]
        else:
            table = self._bytes
            data = b"".join([table[t] for t in tokens[start:end]])
        held = self._held + data if self._held else data
        text, used = _utf8_decode(held, "replace", False)
        self._held = held = held[used:]
        if self._lead is not None:   # H + T has not given a character yet
            self._lead += data
            if not text:
                return ""     # lossy(H + T) is one U+FFFD so far: no text of the tokens' own
            if text[0] == REPLACEMENT:
                text = text[1:]
            else:        # the window's character completed: the text is the tokens' bytes alone
                text, used = _utf8_decode(self._lead, "replace", False)
                self._held = held = self._lead[used:]
            self._lead = None
        self.pending = held.decode("utf-8", "replace") if held else ""
        if text:
            self._parts.append(text)
            self.committed_len += len(text)
        return text

    def stable_len(self) -> int:
        """Length of the text without its trailing U+FFFD: the held bytes' (`pending`), and those
        an invalid byte already left in the committed text."""
        n = self.committed_len
        last = self._parts[-1] if self._parts else ""
        if last and last[-1] != REPLACEMENT:
            return n   # the committed text ends whole (the common case)
        for part in reversed(self._parts):
            kept = part.rstrip(REPLACEMENT)
            n -= len(part) - len(kept)
            if kept:
                break
        return n


def open_segment(b: Branch, start: int, decode: Decoder, skip_ids: frozenset[int], incremental: bool = True,
                 byte_table=None) -> SegmentText:
    """The incremental text of b.token_ids[start:] (in its context): a ByteSegmentText with a
    byte table (`model.byte_table.ByteTable`), else a SegmentText decoding with `decode`."""
    window = branch_window(b, start, skip_ids)
    if byte_table is not None:
        return ByteSegmentText(byte_table, b.token_ids, start, window)
    return SegmentText(decode, b.token_ids, start, window, incremental)


class BranchText:
    """One branch's segments: closed ones (ended by a [Fork] that spawned a child) and the open one."""

    __slots__ = ("segments", "forks", "starts")

    def __init__(self) -> None:
        self.segments: list[SegmentText] = []
        self.forks = 0                       # children already split off
        self.starts: dict[int, SegmentText] = {}

    def own_len(self) -> int:
        return sum(len(s) for s in self.segments)


class TreeText:
    """Incremental text of every branch of one request (the output side's state).

    `sync(b)` takes branch b's new tokens and forks (cost: its new tokens); `segment` renders a
    segment for `apar.recover_text` / `settled_text` from what is already decoded.
    """

    __slots__ = ("decode", "skip_ids", "incremental", "byte_table", "branches", "exact_tokens")

    def __init__(self, decode: Decoder, skip_ids: frozenset[int] = frozenset(), incremental: bool = True,
                 byte_table=None) -> None:
        self.decode = decode
        self.skip_ids = skip_ids
        self.incremental = incremental
        self.byte_table = byte_table         # segments are ByteSegmentText with one (see open_segment)
        self.branches: list[BranchText] = []
        self.exact_tokens = 0                # tokens decoded for segments cut by the budget

    def _new_segment(self, bt: BranchText, b: Branch, start: int) -> SegmentText:
        seg = open_segment(b, start, self.decode, self.skip_ids, self.incremental, self.byte_table)
        bt.segments.append(seg)
        bt.starts[start] = seg
        return seg

    def branch(self, b: Branch, tree: Sequence[Branch]) -> BranchText:
        """Branch b's text state, brought up to date with its tokens and forks."""
        if b.id < len(self.branches):
            bt = self.branches[b.id]
            if bt.segments and bt.forks == len(b.children):   # no new fork: at most new tokens
                bt.segments[-1].advance(len(b.token_ids))
                return bt
        while len(self.branches) <= b.id:
            self.branches.append(BranchText())
        bt = self.branches[b.id]
        if not bt.segments:
            self._new_segment(bt, b, 0)
        children = b.children
        while bt.forks < len(children):
            f = tree[children[bt.forks]].fork_index + 1
            bt.segments[-1].advance(f)
            self._new_segment(bt, b, f)
            bt.forks += 1
        bt.segments[-1].advance(len(b.token_ids))
        return bt

    def sync(self, branches: Sequence[Branch], ids: Sequence[int] | None = None) -> None:
        """Bring the named branches (default: all) up to date."""
        for i in (range(len(branches)) if ids is None else ids):
            self.branch(branches[i], branches)

    def segment_renderer(self, branches: Sequence[Branch]):
        """`segment(b, start, end)` for apar's render walk: the cached text of a whole segment,
        or an exact decode of a segment cut short by the budget."""
        def segment(b: Branch, start: int, end: int) -> str:
            seg = self.branch(b, branches).starts.get(start)
            if seg is not None and seg.end == end:
                return seg.text()
            return self.exact(b, start, end)
        return segment

    def exact(self, b: Branch, start: int, end: int) -> str:
        """The text of b.token_ids[start:end] decoded in full (a segment cut by the budget)."""
        if end <= start:
            return ""
        self.exact_tokens += end - start
        return windowed_text(self.decode, branch_window(b, start, self.skip_ids), b.token_ids[start:end])

    def decoded_tokens(self) -> int:
        """Tokens passed to `decode` so far (the incremental segments' and the exact cuts')."""
        return self.exact_tokens + sum(s.decoded_tokens for bt in self.branches for s in bt.segments)
