"""Streaming APAR output: text in final reading order, and (opt-in) per-branch deltas.

APAR branches write at the same time, so the final text is not the concatenation of what
was generated in time order. `ReadingOrderStreamer` emits, after each engine step, the growth
of `apar.settled_text`: the prefix of the final text that can no longer change (everything
before the first still-running branch in the paragraph tree, minus the end where a stop
string could still complete and cut: `stop_prefixes.StopPrefixes`). The concatenated deltas
therefore equal the final text exactly.

The cost of a step follows what changed, not how much was generated: the branches that got
tokens are detokenized incrementally (`detokenizer.TreeText`, shared with `Engine.finalize`),
and the streamer keeps its place in the reading-order walk (a stack of frames down to the
first running branch), so settled text and finished subtrees are never rendered again. Rare
cases the walk does not follow in place (a max_tokens cut, a stop string that cuts before an
already-streamed fork) hand over to `apar.settled_text` itself, over the cached segment text.

Per-branch deltas (the extension) report each branch's own text as it grows, with its id,
parent and fork point, for clients that render branches side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

from apar_rt.apar import ControlTokens, detail_prefix, settled_text
from apar_rt.core import Branch, BranchDelta, Request
from apar_rt.detokenizer import REPLACEMENT, BranchText, TreeText
from apar_rt.stop_prefixes import StopPrefixes

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BranchEvent:
    """One branch's progress in one step (the per-branch extension)."""

    id: int                      # branch id; 0 is the root
    parent: int | None           # parent branch id; None for the root
    fork_index: int | None       # index of the spawning [Fork] in the parent's token_ids
    token_ids: list[int]         # new tokens this step (a child's first is the forced [Child])
    text: str                    # new text of the branch's own paragraph (children excluded)
    finished: bool

    def to_json(self) -> dict:
        return {"id": self.id, "parent": self.parent, "fork_index": self.fork_index,
                "token_ids": self.token_ids, "text": self.text, "finished": self.finished}


@dataclass(slots=True)
class _Frame:
    """The walk's place in one branch: segment k (its text up to the k-th child's [Fork])."""

    b: Branch
    k: int = 0                   # segment index
    own_len: int = 0             # characters of the segments before k
    emitted: int = 0             # characters of segment k's text emitted (after its join prefix)
    entered: bool = False        # segment k's join prefix is out
    version: int = 0             # SegmentText.version of segment k when it was entered
    in_child: bool = False       # segment k is out and its child's subtree is being walked
    eat_newline: bool = False    # reference join: "\n" went out before this subtree; its own leading "\n" merges


@dataclass(slots=True)
class ReadingOrderStreamer:
    """Per-request state of the reading-order stream. Used in the engine's thread only."""

    request: Request
    text: TreeText               # the request's incremental text (shared with Engine.finalize)
    control: ControlTokens
    skip_ids: frozenset[int]
    stops: tuple[str, ...] = ()  # the request's stop strings: the end of the text where one could
                                 # still complete is held back
    # The common step's state, kept from the last one: (top frame, its branch's token list, its
    # open segment, the request's forks and live branches then, the token index the budget lets
    # the segment reach); None after any other step. (These fields come first: the common step
    # reads them alone, and not the branch itself: fewer objects to fetch from memory.)
    _steady: tuple | None = None
    # With _steady on an append-only segment (a byte-level one, whose committed text only grows),
    # the step runs ahead of the segment and the frame (`_steady_step`): the stream has taken the
    # branch's tokens up to `_seen` and `_taken` characters of the segment's committed text, and
    # `_tail` is what of them is not emitted (a stop string's partial match and any trailing
    # U+FFFD); the frame's `emitted` and `_sent` catch up in `_catch_up`. `_tail` is None otherwise.
    _tail: str | None = None
    _seen: int = 0
    _taken: int = 0
    _whole: list | None = None   # the segment's whole-text table while it holds no bytes (`whole_texts`)
    _quiet: bytearray | None = None   # with _whole: `prefixes.quiet`, at least as long as _whole
    join: str = "inplace"        # the engine's text join (apar.recover_text)
    # the partial matches of `stops` (None: made here; an engine shares one per stop-string tuple)
    prefixes: StopPrefixes | None = None
    diverged: bool = False       # the settled text stopped extending what was sent (a bug)
    _sent: list[str] = field(default_factory=list)      # the text emitted so far, in pieces
    _stack: list[_Frame] = field(default_factory=list)
    _left: float = 0             # output tokens of the budget not yet walked past
    _eaters: int = 0             # frames with eat_newline set
    _started: bool = False
    _done: bool = False          # the walk reached the end: nothing more settles before `finish`
    _fallback: bool = False      # the walk handed over to apar.settled_text
    # each branch's own text sent: [characters, its segments' versions then, the text in pieces]
    _branch_sent: dict[int, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stops = tuple(self.stops)
        if self.prefixes is None:
            self.prefixes = StopPrefixes(self.stops)
        elif self.prefixes.stops != self.stops:
            raise ValueError(f"the stop prefixes are those of {self.prefixes.stops!r}, not of {self.stops!r}")

    @classmethod
    def for_engine(cls, engine, request: Request) -> "ReadingOrderStreamer":
        stops = tuple(request.params.stop)
        return cls(request, engine.text_of(request), engine.control, engine.special_ids, stops,
                   join=engine.config.text_join, prefixes=engine.stop_prefixes(stops))

    @property
    def sent(self) -> str:
        """The text emitted so far."""
        self._catch_up()
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    def step(self, deltas: Sequence[BranchDelta] = ()) -> str:
        """The new settled text after a step. `deltas`: the branches that got tokens (they are
        detokenized now; others are brought up to date when the walk reaches them). The common
        step, where the first running branch runs on in its open segment and no branch of the
        request forked or ended since, reads none of them."""
        steady = self._steady
        if steady is not None:
            # the common step again: the first running branch grew within its open segment, and no
            # branch forked or ended (others, later in reading order, may have grown: they change
            # nothing before its end; an ancestor that ended could cut it off)
            fr, tokens, seg, forks, live, end_limit = steady
            end = len(tokens)
            req = self.request
            if req.forks == forks and req.num_live == live and end <= end_limit:
                tail = self._tail
                if tail is None:   # a segment whose text may change: ask it
                    seg.advance(end)
                    if seg.version == fr.version:
                        return self._open_segment_delta(fr, seg)
                else:
                    seen = self._seen
                    text = self._whole[tokens[seen]] if end == seen + 1 and self._whole is not None else None
                    if not text:   # the segment takes the tokens
                        return self._steady_step(end, seg)
                    # a token of whole text after whole text: its text is what the segment would
                    # commit, and it takes the token later (`_steady_step`, `_catch_up`)
                    self._seen = end
                    self._taken += len(text)
                    if not tail:   # nothing held: a quiet token's text is stable, and all of it goes out
                        quiet = self._quiet[tokens[seen]]
                        if quiet == 1 or (not quiet and self.prefixes.judge(tokens[seen], text)):
                            return text
                    return self._hold(tail + text)
        self._catch_up()
        self._steady = self._tail = None
        req = self.request
        branches = req.branches
        text = self.text
        bt = None                # the last delta's branch text
        for d in deltas:
            bt = text.branch(branches[d.branch_id], branches)
        if self.diverged or self._done:
            return ""
        if not self._started:
            self._started = True
            self._left = float("inf") if req.budget is None else req.budget
            self._stack.append(_Frame(branches[0]))
        if not self._fallback and self._stack and not self._eaters:
            # the common step: the first running branch grew within its open segment
            fr = self._stack[-1]
            b = fr.b
            if b.finish_reason is None and fr.entered and not fr.in_child:
                if len(deltas) != 1 or deltas[0].branch_id != b.id:   # else bt is b's, just brought up to date
                    bt = text.branch(b, branches)
                seg = bt.segments[-1]
                if (fr.k == len(bt.segments) - 1 and seg.version == fr.version and self._left >= seg.end - seg.start
                        and (seg.start == 0 or self.join != "reference")):
                    self._steady = (fr, b.token_ids, seg, req.forks, req.num_live, seg.start + self._left)
                    return self._open_segment_delta(fr, seg)
        if not self._fallback:
            out: list[str] = []
            if self._walk(out):
                delta = "".join(out)
                if delta:
                    self._sent.append(delta)
                return delta
            self._fallback = True
        return self._reference_step()

    def _open_segment_delta(self, fr: _Frame, seg) -> str:
        """The common step's text: the first running branch's open segment `seg` up to its stable
        end less a stop string's partial match, past what frame `fr` emitted. An append-only
        segment's next steps go to `_steady_step`."""
        stable = seg.stable_len()
        length = stable - self.prefixes.held_before(stable, seg.slice)
        delta = ""
        if length > fr.emitted:
            delta = seg.slice(fr.emitted, length)
            fr.emitted = length
            self._sent.append(delta)
        if seg.append_only:
            c = self._taken = seg.committed_len
            self._tail = seg.slice(fr.emitted, c)
            self._seen = seg.end
            self._set_whole(seg)
        else:
            self._tail = None
        return delta

    def _steady_step(self, end: int, seg) -> str:
        """The common step on an append-only segment when the segment takes the tokens (any but
        a token of whole text after whole text): its committed text past `_taken` is the new text
        (the tokens the stream took on its own come in again first), through the tail, whose
        end is stable less its trailing U+FFFD and a stop string's partial match (`_hold`)."""
        added = seg.advance(end)
        c = seg.committed_len
        new = c - self._taken
        text = added[len(added) - new:] if new <= len(added) else seg.slice(self._taken, c)
        self._seen, self._taken = end, c
        self._set_whole(seg)
        return self._hold(self._tail + text)

    def _hold(self, tail: str) -> str:
        """The stable part of `tail` (the text not emitted, which is all a partial match can span:
        what went out had none at its end) less a stop string's partial match goes out; the rest
        stays in `_tail`."""
        stable = tail.rstrip(REPLACEMENT) if tail and tail[-1] == REPLACEMENT else tail
        cut = len(stable) - self.prefixes.held(stable)
        if cut <= 0:
            self._tail = tail
            return ""
        self._tail = tail[cut:]
        return tail[:cut]

    def _set_whole(self, seg) -> None:
        """The common step's whole-text table of append-only segment `seg` (None while it holds
        bytes), and the quiet verdicts of its tokens."""
        whole = self._whole = seg.whole_texts()
        if whole is not None and (self._quiet is None or len(self._quiet) < len(whole)):
            self._quiet = self.prefixes.quiet_table(len(whole))

    def _catch_up(self) -> None:
        """After `_steady_step`s: the segment advanced to the tokens they took (unless a reader
        did), and the frame's `emitted` and the sent text brought to what they emitted."""
        if self._tail is None:
            return
        fr, _, seg = self._steady[:3]
        if seg.end < self._seen:
            seg.advance(self._seen)
        emitted = self._taken - len(self._tail)
        if emitted > fr.emitted:
            self._sent.append(seg.slice(fr.emitted, emitted))
            fr.emitted = emitted

    def _reference_step(self) -> str:
        req = self.request
        now = settled_text(self.text.decode, req.branches, self.control, self.skip_ids, self.stops,
                           join=self.join, budget=req.budget, segment=self.text.segment_renderer(req.branches))
        sent = self.sent
        if not now.startswith(sent):
            if sent.startswith(now):
                # Shorter, not different: a byte-fallback tokenizer shows a whole run of byte tokens
                # as U+FFFD until the run is valid UTF-8 again (the next character's first byte
                # arrived), and settled text drops trailing U+FFFD. Wait for the run to complete.
                return ""
            # settled_text contradicts what was sent; stop streaming early and let `finish` send
            # what it can.
            log.warning("settled text no longer extends the streamed text; holding the rest")
            self.diverged = True
            return ""
        delta = now[len(sent):]
        if delta:
            self._sent.append(delta)
        return delta

    def _emit(self, out: list[str], chunk: str) -> None:
        if not chunk:
            return
        if self._eaters:   # reference join: a subtree's leading "\n" merges with the one sent before it
            for fr in reversed(self._stack):
                if fr.eat_newline:
                    fr.eat_newline = False
                    self._eaters -= 1
                    if chunk[0] == "\n":
                        chunk = chunk[1:]
                        if not chunk:
                            return
        out.append(chunk)

    def _settled_own_end(self, bt: BranchText) -> int:
        """Where a running branch's settled own text ends (as `apar._render` settles it): its
        text's end less an incomplete character and a stop string's partial match, which may
        reach back across the branch's forks."""
        segs = bt.segments
        end = sum(len(seg) for seg in segs[:-1]) + segs[-1].stable_len()
        return end - self.prefixes.held_before(end, partial(_own_slice, bt))

    def _emit_segment(self, out: list[str], fr: _Frame, seg, length: int, joined: bool) -> bool:
        """Send segment text up to `length` raw characters (after `_join_next` when joined).
        False if that is not an extension of what was sent."""
        j = 0
        if joined:   # _join_next(s) == "\n\n" + s[j:], j set by s[:2]; the "\n\n" went out on entry
            h = seg.slice(0, min(2, length))
            j = 2 if h == "\n\n" else (1 if h[:1] == "\n" else 0)
        start = j + fr.emitted
        if length < start:
            return False
        if length > start:
            self._emit(out, seg.slice(start, length))
            fr.emitted = length - j
        return True

    def _walk(self, out: list[str]) -> bool:
        """Advance the reading-order walk as far as text has settled, appending it to `out`.
        Mirrors `apar._render(settled_only=True)`; False hands over to it (a budget cut, a stop
        cut reaching back before a fork, text that changed after it was sent)."""
        stack = self._stack
        branches = self.request.branches
        reference = self.join == "reference"
        while stack:
            fr = stack[-1]
            b = fr.b
            bt: BranchText = self.text.branch(b, branches)
            if fr.in_child:      # back from segment k's child: on to segment k + 1
                fr.in_child = False
                fr.k += 1
                fr.emitted = 0
                fr.entered = False
            seg = bt.segments[fr.k]
            ntok = seg.end - seg.start
            joined = reference and seg.start > 0
            if not fr.entered:
                fr.entered = True
                fr.version = seg.version
                if joined:
                    self._emit(out, "\n\n")
            elif seg.version != fr.version:
                return False
            if self._left < ntok:
                return False
            limit = b.stop_text_len if b.finished else None
            if fr.k < len(bt.segments) - 1:    # closed by a child's [Fork]: all of it, then the child
                if limit is not None and fr.own_len + len(seg) > limit:
                    return False
                if not b.finished:   # a stop string may still begin before the fork
                    settled = self._settled_own_end(bt)
                    if fr.own_len + len(seg) > settled:
                        return self._emit_segment(out, fr, seg, settled - fr.own_len, joined)
                if not self._emit_segment(out, fr, seg, len(seg), joined):
                    return False
                self._left -= ntok
                fr.own_len += len(seg)
                fr.in_child = True
                child = _Frame(branches[b.children[fr.k]])
                if reference:
                    p = detail_prefix(seg.text())
                    if p:
                        self._emit(out, p)
                        child.eat_newline = True
                        self._eaters += 1
                stack.append(child)
                continue
            if b.finished:                     # the last segment of a finished branch
                length = len(seg)
                if limit is not None:
                    if fr.k > 0 and limit < fr.own_len:
                        return False
                    length = min(length, limit - fr.own_len)
                if not self._emit_segment(out, fr, seg, length, joined):
                    return False
                self._left -= ntok
                stack.pop()
                if fr.eat_newline:
                    self._eaters -= 1
                continue
            # the first running branch: its text so far, less an incomplete character and a stop
            # string's partial match
            stable = seg.stable_len()
            held = self.prefixes.held_before(stable, seg.slice)
            return self._emit_segment(out, fr, seg, stable - held, joined)
        self._done = True
        return True

    def finish(self, final_text: str) -> str:
        """The rest of the final text. The stream then equals `final_text` unless diverged."""
        sent = self.sent
        self._steady = None
        self._tail = None
        if final_text.startswith(sent):
            delta = final_text[len(sent):]
            self._sent = [final_text]
            return delta
        log.error("the streamed text %r is not a prefix of the final text %r", sent[-40:], final_text[-40:])
        self.diverged = True
        return ""

    def branch_events(self, deltas: Sequence[BranchDelta]) -> list[BranchEvent]:
        """Per-branch deltas of this step: tokens, and the branch's own new settled text (its
        segments' text: less an incomplete character and a stop string's partial match while it
        runs, cut by its stop string when it ended on one)."""
        branches = self.request.branches
        events = []
        for d in deltas:
            b = branches[d.branch_id]
            bt = self.text.branch(b, branches)
            total = bt.own_len()
            if b.finished:
                end = total if b.stop_text_len is None else min(total, b.stop_text_len)
            else:
                strip = 0
                for seg in reversed(bt.segments):
                    stable = seg.stable_len()
                    strip += len(seg) - stable
                    if stable:
                        break
                end = total - strip
                end -= self.prefixes.held_before(end, partial(_own_slice, bt))
            version = sum(seg.version for seg in bt.segments)
            sent = self._branch_sent.get(b.id)
            if sent is None:
                sent = self._branch_sent[b.id] = [0, version, []]
            new = ""
            if version != sent[1]:   # text already sent may have changed: compare in full
                prev = "".join(sent[2])
                text = _own_slice(bt, 0, end)
                if text.startswith(prev):   # else compare in full again next time
                    new = text[len(prev):]
                    sent[0], sent[1], sent[2] = end, version, [text]
            elif end > sent[0]:
                new = _own_slice(bt, sent[0], end)
                sent[0] = end
                sent[2].append(new)
            events.append(BranchEvent(b.id, b.parent, b.fork_index, list(d.new_token_ids), new, d.finished))
        return events


def _own_slice(bt: BranchText, a: int, b: int) -> str:
    """A branch's own text [a:b] (its segments' text concatenated)."""
    parts = []
    pos = 0
    for seg in bt.segments:
        n = len(seg)
        if pos + n > a and pos < b:
            parts.append(seg.slice(max(0, a - pos), min(n, b - pos)))
        pos += n
        if pos >= b:
            break
    return "".join(parts)
