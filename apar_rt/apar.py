"""APAR semantics: control tokens, the sampling bans, forking, and text recovery.

Pure Python (no torch). The rules follow THUDM/APAR:
- [Fork] (`[SplitMask]`) sampled by a branch forks a child that shares the branch's
  context up to and including that [Fork]; the child is fed a forced [Child] (`[SplitSop]`).
- [Child] is never sampled. [Fork] is banned right after [Fork] or [Child], at depth
  >= max_depth, in AR mode, and optionally while the step is full.
- The final text walks the paragraph tree: a node's own text up to a [Fork], then that
  child's whole text, then the node's continuation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from apar_rt.core import Branch
from apar_rt.stop_prefixes import StopPrefixes

FORK_TOKEN = "[SplitMask]"
CHILD_TOKEN = "[SplitSop]"


@dataclass(frozen=True, slots=True)
class ControlTokens:
    """Ids of [Fork] and [Child]; None when the model has no such token (it never forks)."""

    fork: int | None = None
    child: int | None = None

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(t for t in (self.fork, self.child) if t is not None)


def banned_tokens(last_token: int | None, depth: int, control: ControlTokens, *, mode: str, max_depth: int,
                  step_full: bool = False) -> list[int]:
    """Token ids a branch at `depth` whose context ends in `last_token` may not sample next."""
    banned = [] if control.child is None else [control.child]
    fork = control.fork
    if fork is None:
        return banned
    if (mode == "ar" or depth >= max_depth or step_full
            or last_token == fork or (last_token == control.child and last_token is not None)):
        banned.append(fork)
    return banned


class Decoder(Protocol):
    def __call__(self, token_ids: Sequence[int]) -> str: ...


_WINDOW = 8  # context tokens kept to decode a continuation with the right leading whitespace


def context_window(context: Sequence[int], skip_ids: frozenset[int] = frozenset()) -> list[int]:
    """The last _WINDOW tokens of `context` that are not in skip_ids (in order): what a
    continuation is decoded after. Scans from the end, so its cost does not grow with `context`."""
    window: list[int] = []
    for t in reversed(context):
        if t not in skip_ids:
            window.append(t)
            if len(window) == _WINDOW:
                break
    window.reverse()
    return window


def branch_window(b: Branch, start: int, skip_ids: frozenset[int] = frozenset()) -> list[int]:
    """`context_window` of b.context()[:len(b.prefix) + start] (what b's token_ids[start:] is
    decoded after), without building that context."""
    window: list[int] = []
    for seq, end in ((b.token_ids, start), (b.prefix, len(b.prefix))):
        for i in range(end - 1, -1, -1):
            t = seq[i]
            if t not in skip_ids:
                window.append(t)
                if len(window) == _WINDOW:
                    window.reverse()
                    return window
    window.reverse()
    return window


def windowed_text(decode: Decoder, window: list[int], new: Sequence[int], head: str | None = None) -> str:
    """The text `new` adds after `window` (see `continuation_text`); `head` is decode(window)
    when the caller has it."""
    if head is None:
        head = decode(window) if window else ""
    full = decode(window + list(new))
    if full.startswith(head):
        return full[len(head):]
    return decode(list(new))


def continuation_text(decode: Decoder, context: Sequence[int], new: Sequence[int],
                      skip_ids: frozenset[int] = frozenset()) -> str:
    """The text that `new` adds after `context`, as the tokenizer would render it in place.

    `decode` must skip special tokens. A few context tokens (not in skip_ids) are decoded
    along with `new`, so the first new token keeps its leading space.
    """
    return windowed_text(decode, context_window(context, skip_ids), new)


def branch_text(decode: Decoder, branch: Branch, skip_ids: frozenset[int] = frozenset()) -> str:
    """A branch's own text, children excluded (what stop strings are matched against)."""
    return continuation_text(decode, branch.prefix, branch.token_ids, skip_ids)


TEXT_JOINS = ("inplace", "reference")
_NO_STOPS = StopPrefixes()


def _join_detail(own: str, detail: str) -> str:
    """THUDM/APAR's rule for a child's text: after a numbered item it starts on a new line."""
    if detail.startswith("\n"):
        return detail
    return detail_prefix(own) + detail.lstrip("\n")


def _join_next(text: str) -> str:
    """THUDM/APAR's rule for a parent's continuation after a child: it starts a new paragraph."""
    return text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")


def reading_order_counts(branches: Sequence[Branch], budget: int | None) -> dict[int, int]:
    """Tokens of each branch inside the first `budget` tokens of the tree in reading order
    (a branch's tokens up to a [Fork], that child's whole subtree, then the continuation).
    Branches wholly past the budget get 0. budget None keeps everything. O(branches)."""
    if budget is None:
        return {b.id: len(b.token_ids) for b in branches}
    kids: dict[int, list[Branch]] = {}
    for b in branches:
        if b.parent is not None:
            kids.setdefault(b.parent, []).append(b)
    kept = {b.id: 0 for b in branches}
    left = budget

    def walk(b: Branch) -> None:
        nonlocal left
        cursor = 0
        for c in sorted(kids.get(b.id, ()), key=lambda c: c.fork_index):
            take = min(c.fork_index + 1 - cursor, left)
            left -= take
            cursor += take
            if left == 0:
                break
            walk(c)
            if left == 0:
                break
        else:
            take = min(len(b.token_ids) - cursor, left)
            left -= take
            cursor += take
        kept[b.id] = cursor

    if branches and left > 0:
        walk(branches[0])
    return kept


class SegmentText(Protocol):
    def __call__(self, branch: Branch, start: int, end: int) -> str: ...


def segment_text(decode: Decoder, skip_ids: frozenset[int] = frozenset()) -> SegmentText:
    """The text of branch.token_ids[start:end] in its place (the default segment renderer:
    one `continuation_text` decode; `detokenizer.TreeText.segment` gives the same text from
    its incremental state)."""
    def render(b: Branch, start: int, end: int) -> str:
        return windowed_text(decode, branch_window(b, start, skip_ids), b.token_ids[start:end])
    return render


def recover_text(decode: Decoder, branches: Sequence[Branch], control: ControlTokens,
                 skip_ids: frozenset[int] = frozenset(), join: str = "inplace", budget: int | None = None,
                 segment: SegmentText | None = None) -> str:
    """The final text: walk the paragraph tree from the root in reading order.

    Only the first `budget` tokens in reading order count (None: all); a stop string's cut
    applies only to a branch kept whole. A branch's own text is cut at `stop_text_len` when a stop string ended it. join="inplace"
    decodes every piece where it stands (exactly the model's text); "reference" applies
    THUDM/APAR's newline fix-ups (a detail after "N. " starts a line, a continuation a paragraph).

    This is the text contract. A branch's text is split into segments after each [Fork] that
    spawned a child; `segment(branch, start, end)` renders token_ids[start:end] in its place
    (default: `segment_text(decode, skip_ids)`, a decode per segment; the engine passes its
    incremental detokenizers' cached text, which is the same text).
    """
    return _render(segment or segment_text(decode, skip_ids), branches, settled_only=False, stops=_NO_STOPS,
                   join=join, budget=budget)


def settled_text(decode: Decoder, branches: Sequence[Branch], control: ControlTokens,
                 skip_ids: frozenset[int] = frozenset(), stops: Sequence[str] = (), join: str = "inplace",
                 budget: int | None = None, segment: SegmentText | None = None) -> str:
    """The longest prefix of the final text that can no longer change.

    Reading order stops at the first branch still running: its open segment's text so far is
    settled except an incomplete character and then the end where one of the request's `stops`
    could still complete and cut (`StopPrefixes.held`); everything after it in reading order is
    not. Streaming the growth of this value yields exactly `recover_text` once all branches
    finish (the servers' `ReadingOrderStreamer` computes its growth incrementally and is tested
    against this).
    """
    return _render(segment or segment_text(decode, skip_ids), branches, settled_only=True,
                   stops=StopPrefixes(stops), join=join, budget=budget)


def detail_prefix(own: str) -> str:
    """What THUDM/APAR's join puts before a child's text that does not start with a newline."""
    return "\n" if re.search(r"\d+\. ", own) else ""


def _render(segment: SegmentText, branches, *, settled_only: bool, stops: StopPrefixes, join: str,
            budget: int | None = None) -> str:
    if join not in TEXT_JOINS:
        raise ValueError(f"text join must be one of {', '.join(TEXT_JOINS)}, got {join!r}")
    reference = join == "reference"
    children: dict[tuple[int, int], Branch] = {}
    forks_of: dict[int, list[int]] = {}
    for b in branches:
        if b.parent is not None:
            children[(b.parent, b.fork_index)] = b
            forks_of.setdefault(b.parent, []).append(b.fork_index)
    kept = reading_order_counts(branches, budget)

    def growing(b: Branch) -> bool:
        """Whether b or a branch of its subtree is still running."""
        return not b.finished or any(growing(children[(b.id, i)]) for i in forks_of.get(b.id, ()))

    def render(b: Branch) -> tuple[str, bool]:
        """(text, complete): complete is False when reading order stops inside b.

        A stop string cuts its branch's own text where it begins: a child forked before that
        point is kept (its text comes before the stop string in reading order), one forked after
        it is not, though its tokens still count in the budget (`reading_order_counts`). A
        running branch's own text is settled up to its end less an incomplete character and a
        stop string's partial match, which may reach back across its forks: the children of the
        forks past that point are not settled either."""
        parts: list[str] = []
        own_len = 0
        n = kept[b.id]
        whole = n == len(b.token_ids)
        limit = b.stop_text_len if whole else None
        # a child none of whose tokens is inside the budget is not in the text: it forked at b's
        # last kept token ([Fork]), and whether it was started before the budget reached it
        # depends on the schedule (a branch earlier in reading order may grow after it forks)
        fork_points = sorted(i for i in forks_of.get(b.id, ()) if i < n and kept[children[(b.id, i)].id])
        ends = fork_points + [n]
        starts = [0] + [i + 1 for i in fork_points]
        raws = [segment(b, start, min(i + 1, n)) for start, i in zip(starts, ends)]
        settled = None   # with an open end: where b's settled own text ends
        if settled_only and not b.finished and whole:
            own = "".join(raws[:-1]) + raws[-1].rstrip("\ufffd")
            settled = len(own) - stops.held(own)
        for cursor, i, raw in zip(starts, ends, raws):
            seg = raw
            cut = limit is not None and own_len + len(raw) > limit
            held = settled is not None and (i == n or own_len + len(raw) > settled)
            if cut:
                seg = raw[:limit - own_len]
            elif held:
                seg = raw[:max(0, settled - own_len)]
            if reference and cursor > 0:
                seg = _join_next(seg)
            parts.append(seg)
            if held:
                return "".join(parts), False
            if cut:   # the forks from here on are dropped; a branch still running among their
                # subtrees still takes tokens of the budget, so nothing after b is settled yet
                return "".join(parts), not (settled_only and budget is not None and any(
                    growing(children[(b.id, f)]) for f in fork_points if f >= i))
            own_len += len(raw)
            if i < n:
                child_text, child_done = render(children[(b.id, i)])
                parts.append(_join_detail(raw, child_text) if reference else child_text)
                if not child_done:
                    return "".join(parts), False
        return "".join(parts), True

    return render(branches[0])[0]


def branch_schema(branches: Sequence[Branch], budget: int | None = None) -> list[dict]:
    """The public `branches` list of the --json schema: the branches inside the first `budget`
    tokens in reading order, each cut to its tokens there, numbered in reading order (pre-order:
    a branch before its children, children in fork order), so the list depends on the request
    alone, not on the order in which branches happened to be created."""
    kept = reading_order_counts(branches, budget)
    kids: dict[int, list[Branch]] = {}
    for b in branches:
        if b.parent is not None:
            kids.setdefault(b.parent, []).append(b)
    out: list[dict] = []

    def walk(b: Branch, parent: int | None) -> None:
        if kept[b.id] == 0 and b.parent is not None:
            return
        new_id = len(out)
        out.append({"id": new_id, "parent": parent, "fork_index": b.fork_index,
                    "token_ids": list(b.token_ids[:kept[b.id]])})
        for c in sorted(kids.get(b.id, ()), key=lambda c: c.fork_index):
            walk(c, new_id)

    if branches:
        walk(branches[0], None)
    return out
