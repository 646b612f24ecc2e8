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


def continuation_text(decode: Decoder, context: Sequence[int], new: Sequence[int],
                      skip_ids: frozenset[int] = frozenset()) -> str:
    """The text that `new` adds after `context`, as the tokenizer would render it in place.

    `decode` must skip special tokens. A few context tokens (not in skip_ids) are decoded
    along with `new`, so the first new token keeps its leading space.
    """
    window: list[int] = []
    for t in reversed(context):
        if t not in skip_ids:
            window.append(t)
            if len(window) == _WINDOW:
                break
    window.reverse()
    head = decode(window) if window else ""
    full = decode(window + list(new))
    if full.startswith(head):
        return full[len(head):]
    return decode(list(new))


def branch_text(decode: Decoder, branch: Branch, skip_ids: frozenset[int] = frozenset()) -> str:
    """A branch's own text, children excluded (what stop strings are matched against)."""
    return continuation_text(decode, branch.prefix, branch.token_ids, skip_ids)


TEXT_JOINS = ("inplace", "reference")


def _join_detail(own: str, detail: str) -> str:
    """THUDM/APAR's rule for a child's text: after a numbered item it starts on a new line."""
    if detail.startswith("\n"):
        return detail
    return ("\n" if re.search(r"\d+\. ", own) else "") + detail.lstrip("\n")


def _join_next(text: str) -> str:
    """THUDM/APAR's rule for a parent's continuation after a child: it starts a new paragraph."""
    return text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")


def recover_text(decode: Decoder, branches: Sequence[Branch], control: ControlTokens,
                 skip_ids: frozenset[int] = frozenset(), join: str = "inplace") -> str:
    """The final text: walk the paragraph tree from the root in reading order.

    A branch's own text is cut at `stop_text_len` when a stop string ended it. join="inplace"
    decodes every piece where it stands (exactly the model's text); "reference" applies
    THUDM/APAR's newline fix-ups (a detail after "N. " starts a line, a continuation a paragraph).
    """
    return _render(decode, branches, control, skip_ids, settled_only=False, holdback=0, join=join)


def settled_text(decode: Decoder, branches: Sequence[Branch], control: ControlTokens,
                 skip_ids: frozenset[int] = frozenset(), holdback: int = 0, join: str = "inplace") -> str:
    """The longest prefix of the final text that can no longer change.

    Reading order stops at the first branch still running: its own text so far is settled
    except the last `holdback` characters (a stop string could still cut there) and any
    incomplete character; everything after it in reading order is not. Streaming the growth
    of this value yields exactly `recover_text` once all branches finish.
    """
    return _render(decode, branches, control, skip_ids, settled_only=True, holdback=holdback, join=join)


def _render(decode, branches, control, skip_ids, *, settled_only: bool, holdback: int, join: str) -> str:
    if join not in TEXT_JOINS:
        raise ValueError(f"text join must be one of {', '.join(TEXT_JOINS)}, got {join!r}")
    reference = join == "reference"
    children: dict[tuple[int, int], Branch] = {}
    for b in branches:
        if b.parent is not None:
            children[(b.parent, b.fork_index)] = b

    def render(b: Branch) -> tuple[str, bool]:
        """(text, complete): complete is False when reading order stops inside b."""
        parts: list[str] = []
        own_len = 0
        cursor = 0
        limit = b.stop_text_len
        open_end = settled_only and not b.finished
        fork_points = [i for i, t in enumerate(b.token_ids) if t == control.fork and (b.id, i) in children]
        for i in fork_points + [len(b.token_ids)]:
            raw = continuation_text(decode, b.context_slice(0, len(b.prefix) + cursor),
                                    b.token_ids[cursor:i + 1], skip_ids)
            seg = raw
            cut = limit is not None and own_len + len(raw) >= limit
            if cut:
                seg = raw[:limit - own_len]
            elif i == len(b.token_ids) and open_end:
                seg = raw.rstrip("\ufffd")
                seg = seg[:max(0, len(seg) - holdback)]
            if reference and cursor > 0:
                seg = _join_next(seg)
            parts.append(seg)
            if cut:
                return "".join(parts), True
            own_len += len(raw)
            if i < len(b.token_ids):
                child_text, child_done = render(children[(b.id, i)])
                parts.append(_join_detail(raw, child_text) if reference else child_text)
                if not child_done:
                    return "".join(parts), False
            cursor = i + 1
        return "".join(parts), not open_end

    return render(branches[0])[0]


def branch_schema(branches: Sequence[Branch]) -> list[dict]:
    """The public `branches` list of the --json schema."""
    return [{"id": b.id, "parent": b.parent, "fork_index": b.fork_index, "token_ids": list(b.token_ids)}
            for b in branches]
