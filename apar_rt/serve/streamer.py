"""Streaming APAR output: text in final reading order, and (opt-in) per-branch deltas.

APAR branches write at the same time, so the final text is not the concatenation of what
was generated in time order. `ReadingOrderStreamer` emits, after each engine step, the growth
of `apar.settled_text`: the prefix of the final text that can no longer change (everything
before the first still-running branch in the paragraph tree, minus a holdback where a stop
string could still cut). The concatenated deltas therefore equal the final text exactly.

Per-branch deltas (the extension) report each branch's own text as it grows, with its id,
parent and fork point, for clients that render branches side by side.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Sequence

from apar_rt.apar import ControlTokens, branch_text, settled_text
from apar_rt.core import Branch, BranchDelta

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


def _memo_decoder(decode, size: int = 256):
    """`decode` with a small LRU cache. Re-rendering the tree each step decodes the same
    settled segments again; only the frontier's growing segment is new (about 15x less work)."""
    cached = functools.lru_cache(maxsize=size)(lambda ids: decode(ids))
    return lambda token_ids: cached(tuple(token_ids))


@dataclass(slots=True)
class ReadingOrderStreamer:
    """Per-request state of the reading-order stream. Used in the engine's thread only."""

    decode: object               # token ids -> text, skipping special tokens
    control: ControlTokens
    skip_ids: frozenset[int]
    holdback: int = 0            # characters a stop string could still cut: max(len(stop)) - 1
    join: str = "inplace"        # the engine's text join (apar.recover_text)
    sent: str = ""               # the text emitted so far
    branch_sent: dict[int, str] = field(default_factory=dict)
    diverged: bool = False       # the settled text stopped extending what was sent (a bug)

    @classmethod
    def for_engine(cls, engine, stop: Sequence[str] = ()) -> "ReadingOrderStreamer":
        holdback = max((len(s) for s in stop), default=1) - 1
        return cls(_memo_decoder(engine.decode), engine.control, engine.special_ids, holdback,
                   join=engine.config.text_join)

    def step(self, branches: Sequence[Branch], budget: int | None = None) -> str:
        """The new settled text after a step (`budget`: the request's output tokens in reading order)."""
        if self.diverged:
            return ""
        now = settled_text(self.decode, branches, self.control, self.skip_ids, self.holdback, join=self.join,
                           budget=budget)
        if not now.startswith(self.sent):
            # settled_text promises a growing prefix; if it ever does not, stop streaming
            # early and let `finish` send what it can.
            log.warning("settled text no longer extends the streamed text; holding the rest")
            self.diverged = True
            return ""
        delta = now[len(self.sent):]
        self.sent = now
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the final text. The stream then equals `final_text` unless diverged."""
        if final_text.startswith(self.sent):
            delta = final_text[len(self.sent):]
            self.sent = final_text
            return delta
        log.error("the streamed text %r is not a prefix of the final text %r", self.sent[-40:],
                  final_text[-40:])
        self.diverged = True
        return ""

    def branch_events(self, branches: Sequence[Branch], deltas: Sequence[BranchDelta]) -> list[BranchEvent]:
        """Per-branch deltas of this step: tokens, and the branch's own new settled text."""
        events = []
        for d in deltas:
            b = branches[d.branch_id]
            text = branch_text(self.decode, b, self.skip_ids)
            if b.finished:
                if b.stop_text_len is not None:
                    text = text[:b.stop_text_len]
            else:
                text = text.rstrip("\ufffd")
                text = text[:max(0, len(text) - self.holdback)]
            prev = self.branch_sent.get(b.id, "")
            new = text[len(prev):] if text.startswith(prev) else ""
            if text.startswith(prev):
                self.branch_sent[b.id] = text
            events.append(BranchEvent(b.id, b.parent, b.fork_index, list(d.new_token_ids), new, d.finished))
        return events
