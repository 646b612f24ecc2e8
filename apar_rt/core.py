"""Shared types of the runtime: sampling parameters, requests and their branches, step I/O.

No heavy imports here: numpy only, for the packed step that backends consume.
"""

from __future__ import annotations

import enum
import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from apar_rt.kv.block_pool import BlockTable

INT32_MAX = (1 << 31) - 1
GREEDY_TEMPERATURE = 1e-5   # a temperature below this is greedy (vLLM's _SAMPLING_EPS)
MAX_LOGIT_BIAS = 300        # logit_bias entries per request (OpenAI's limit)


def _check_int(name: str, v, lo: int, hi: int, note: str = "") -> int:
    """`v` must be a Python/numpy integer (not a bool) in [lo, hi]; checked before any cast."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r:.80}")
    v = int(v)
    if not lo <= v <= hi:
        shown = v if v.bit_length() <= 64 else f"an integer of {v.bit_length()} bits"
        note = f" {note}" if note else ""
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}]{note}, got {shown}")
    return v


def _check_float(name: str, v) -> float:
    """`v` must be a finite real number (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {v!r:.80}")
    try:
        f = float(v)
    except OverflowError:     # an int too big for a float
        bits = int(v).bit_length()
        raise ValueError(f"{name} must be a finite number, got an integer of {bits} bits") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {f}")
    return f


def _items(name: str, value, allowed: str):
    """A collection field's value: () for None (as vLLM's SamplingParams takes it), a string or
    dict as it is, any other iterable as a tuple; ValueError naming the field otherwise."""
    if value is None:
        return ()
    if isinstance(value, (str, dict, tuple)):
        return value
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be {allowed} (or None), got {type(value).__name__} {value!r}") from None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling, validated on construction (ValueError names the bad field).

    `max_tokens` caps the request's output: its first `max_tokens` new tokens in reading order
    (the order of the final text: a branch's tokens up to a [Fork], then that child's whole
    subtree, then the branch's continuation; forced [Child] tokens count). Tokens a branch would
    write past that point are never part of the output, so the output does not depend on how
    branches happened to be scheduled. temperature == 0 is greedy, and so is any temperature below
    GREEDY_TEMPERATURE (stored as 0). Every number is range-checked (ints before any cast, floats
    must be finite); logit_bias holds at most MAX_LOGIT_BIAS distinct token ids.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 disables
    seed: int | None = None
    stop: tuple[str, ...] = ()          # a branch ends when its text contains one of these
    stop_token_ids: tuple[int, ...] = ()  # end a branch like EOS
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI style: added to the logits
    ignore_eos: bool = False
    mode: str | None = None             # "apar" or "ar" for this request; None: the engine's mode

    def __post_init__(self) -> None:
        if self.mode not in (None, "apar", "ar"):
            raise ValueError(f"mode must be 'apar' or 'ar' (or None for the engine's), got {self.mode!r}")
        _check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        temperature = _check_float("temperature", self.temperature)
        if temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if temperature < GREEDY_TEMPERATURE:   # as vLLM: a near-zero temperature is greedy
            temperature = 0.0
        object.__setattr__(self, "temperature", temperature)
        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        object.__setattr__(self, "top_p", top_p)
        _check_int("top_k", self.top_k, 0, INT32_MAX, "(0 disables)")
        if self.seed is not None:
            _check_int("seed", self.seed, -(1 << 63), (1 << 64) - 1)
        stop = _items("stop", self.stop, "a string or a list of strings")
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(
            _check_int("stop_token_ids", t, 0, INT32_MAX)
            for t in _items("stop_token_ids", self.stop_token_ids, "a list of token ids")))
        bias = _items("logit_bias", self.logit_bias, "a mapping of token id to bias")
        bias = list(bias.items() if isinstance(bias, dict) else bias)
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        pairs = []
        for tok, val in bias:
            tok = _check_int("logit_bias token id", tok, 0, INT32_MAX)
            val = _check_float(f"logit_bias for token {tok}", val)
            if not -100.0 <= val <= 100.0:
                raise ValueError(f"logit_bias for token {tok} must be in [-100, 100], got {val}")
            pairs.append((tok, val))
        pairs.sort()
        dup = next((a for (a, _), (b, _) in zip(pairs, pairs[1:]) if a == b), None)
        if dup is not None:
            raise ValueError(f"logit_bias names token {dup} more than once")
        object.__setattr__(self, "logit_bias", tuple(pairs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens or the model's length cap
    ABORT = "abort"      # aborted by the caller
    ERROR = "error"      # the request cannot be served (its message says why)


@dataclass(slots=True, eq=False)
class Branch:
    """One APAR thread: a node of the paragraph tree and a sequence with its own KV table.

    The branch's context is `prefix + token_ids`, where `prefix` is the prompt followed by
    each ancestor's tokens up to and including the [Fork] that leads here (root first).
    `prefix` is an int32 `array` (4 bytes a token, no int objects: 256 requests of 4,096-token
    prompts held 36 MiB more as lists of ints), never changed once made; the root's is the
    request's `prompt_token_ids` itself.
    """

    id: int                              # index in Request.branches; 0 is the root
    parent: int | None                   # parent branch id; None for the root
    fork_index: int | None               # index of the spawning [Fork] in the parent's token_ids
    depth: int                           # 0 for the root
    prefix: array                        # context before this branch's own tokens (int32, read-only)
    token_ids: list[int] = field(default_factory=list)  # own tokens; a child's begin with [Child]
    table: BlockTable = field(default_factory=BlockTable)  # KV blocks; table.num_tokens are cached
    children: list[int] = field(default_factory=list)   # child branch ids, in fork (reading) order
    subtree_tokens: int = 0              # own tokens plus every descendant's
    finish_reason: FinishReason | None = None
    stop_text_len: int | None = None     # a stop string cut the last segment's text to this length
    draft: list[int] | None = None       # Medusa draft tokens (one per tree node) for the next step
    stop_text: Any = None                # the scheduler's incremental text of token_ids (detokenizer.SegmentText), for stop strings
    # the RNG of this branch's draws (a sampled request's; None when greedy): the root's is the
    # request's, a child's is seeded by the request's seed and its place in the tree
    # (sampler.make_generator), so a branch draws the same numbers however the steps are packed
    generator: Any = None
    prefix_len: int = field(init=False)  # len(prefix), which never changes (read per step without touching the list)

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, array):
            self.prefix = array("i", self.prefix)
        self.prefix_len = len(self.prefix)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context_len(self) -> int:
        return self.prefix_len + len(self.token_ids)

    def context(self) -> list[int]:
        return self.prefix.tolist() + self.token_ids

    def child_prefix(self, n: int) -> array:
        """The prefix of a child forked after this branch's first n tokens (through its [Fork])."""
        return self.prefix + array("i", self.token_ids[:n])

    def context_slice(self, start: int, stop: int) -> list[int]:
        """context()[start:stop] without building the whole context (the per-step hot path)."""
        p = self.prefix_len
        if start >= p:
            return self.token_ids[start - p:stop - p]
        return self.prefix[start:stop].tolist() + self.token_ids[:max(0, stop - p)]

    @property
    def num_uncomputed(self) -> int:
        return self.context_len - self.table.num_tokens


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """A prompt and its tree of branches, as the scheduler tracks it."""

    request_id: str
    prompt: str
    prompt_token_ids: array              # made an int32 array (as Branch.prefix), never changed
    params: SamplingParams
    branches: list[Branch] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    generator: Any = None                # the root branch's RNG (sampler.make_generator); None when greedy
    error: str | None = None
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    decode_steps: int = 0                # engine steps in which this request produced tokens
    forks: int = 0
    peak_kv_blocks: int = 0              # most distinct KV blocks held at once
    # Branch id -> (donor branch id, tokens of shared context): the branch waits until the donor
    # has computed that many tokens, then forks the donor's blocks. A fork's child waits so for its
    # parent's [Fork]; after a preemption, a branch for a sibling it shares a prefix with.
    prefix_donors: dict[int, tuple[int, int]] = field(default_factory=dict)
    accepted_lengths: dict[int, int] = field(default_factory=dict)  # tokens per thread-step -> count
    num_generated: int = 0               # tokens appended over all branches (work done, may pass the budget)
    num_live: int = 1                    # branches not finished
    kv_blocks: int = 0                   # distinct KV blocks held now (forked blocks count once)
    budget: int = 0                      # output tokens in reading order: min(max_tokens, context room)
    detok: Any = None                    # the output side's incremental text (detokenizer.TreeText), made on first use
    # with stop strings and a stop filter: its verdict per token id (StopFilter.verdicts), read
    # before the filter is asked
    stop_verdicts: bytearray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_token_ids, array):
            self.prompt_token_ids = array("i", self.prompt_token_ids)
        if not self.branches:
            self.branches.append(Branch(id=0, parent=None, fork_index=None, depth=0,
                                        prefix=self.prompt_token_ids, generator=self.generator))

    def tree_path(self, b: Branch) -> tuple[int, ...]:
        """Where `b` lies in the tree: the fork index of each branch from the root's child down to
        `b` (() for the root). It follows from the tokens alone, not from when branches forked."""
        path = []
        while b.parent is not None:
            path.append(b.fork_index)
            b = self.branches[b.parent]
        return tuple(reversed(path))

    @property
    def generated_tokens(self) -> int:
        """Output tokens so far: what was generated, capped at the reading-order budget (so the
        count only grows, and ends at the final output's size)."""
        return min(self.num_generated, self.budget)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def live_branches(self) -> list[Branch]:
        return [b for b in self.branches if not b.finished]

    def held_blocks(self) -> set[int]:
        """The distinct KV blocks held (a scan, for tests; the scheduler keeps `kv_blocks`)."""
        return {blk for b in self.branches for blk in b.table.block_ids}

    def start_position(self, b: Branch) -> int:
        """Output tokens before branch b's first token in reading order, counting what exists
        now (a lower bound while earlier branches still grow; exact once they have finished).
        O(depth x siblings)."""
        pos = 0
        while b.parent is not None:
            p = self.branches[b.parent]
            pos += b.fork_index + 1
            for cid in p.children:
                if cid == b.id:
                    break
                pos += self.branches[cid].subtree_tokens
            b = p
        return pos

    def next_position(self, b: Branch) -> int:
        """Reading-order position that branch b's next token would take (a lower bound)."""
        return self.start_position(b) + b.subtree_tokens


@dataclass(slots=True)
class ScheduledSeq:
    """One branch's share of a packed step."""

    request: Request
    branch: Branch
    num_new: int                          # new tokens fed this step
    slots: list[int]                      # reserved KV slots (per new token; for a tree: root + depth)
    samples: bool                         # whether logits are sampled (the last token, or the tree)
    tree: bool = False                    # a Medusa draft tree: root + draft nodes (the step writes its
    #                                       first path's K/V, the engine accepted nodes off it)
    accepted: int = 0                     # tokens appended by this step (set by Scheduler.update)
    # A replayed step (Scheduler._replay_decodes) reuses the last step's sequences: its slots are
    # in its StepInput.slot_mapping only (`slots` keeps the first step's), and nothing reads
    # `accepted` after it (no tree, no drafting).


@dataclass(slots=True)
class StepInput:
    """A packed, ragged step in the form every backend consumes (the op contract's inputs).

    Shapes: T new tokens over B sequences; max_q = the most new tokens of one sequence.
    """

    input_ids: np.ndarray        # [T] int32
    positions: np.ndarray        # [T] int32, position of each token in its sequence's context
    block_tables: np.ndarray     # [B, max_blocks] int32, padded with the null block 0
    context_lens: np.ndarray     # [B] int32, tokens already cached per sequence
    query_start: np.ndarray      # [B+1] int32, offsets of each sequence's tokens in T
    mask: np.ndarray             # [T, max_q] bool, visibility among a sequence's own new tokens
    slot_mapping: np.ndarray     # [T] int32, where each token's new K/V is written; -1 skips
    logits_indices: np.ndarray   # [N] int32, tokens whose logits are returned
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the step

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(slots=True)
class SchedulerOutput:
    """What `Scheduler.schedule` decided for one step."""

    seqs: list[ScheduledSeq]
    step: StepInput | None
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)   # finished with an error this step
    replayable: bool = False     # the next step may replay this one (Scheduler._replay_decodes)
    replayed: bool = False       # this step replays the last one: the same seqs, one token further
    feeds_control: bool = True   # the step feeds [Fork] or [Child] (False only where known: replayable steps)

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class BranchDelta:
    """New tokens of one branch in one step."""

    branch_id: int
    parent: int | None
    fork_index: int | None
    new_token_ids: list[int]
    finished: bool


def request_stats(*, decode_steps: int = 0, forks: int = 0, generated_tokens: int = 0, peak_kv_blocks: int = 0,
                  preemptions: int = 0, accepted_lengths: dict[int, int] | None = None) -> dict:
    """A finished request's `stats` (the `--json` schema's keys; all zero for a request that
    never ran). accepted_lengths: Medusa thread steps by number of tokens accepted."""
    hist = accepted_lengths or {}
    thread_steps = sum(hist.values())
    return {"decode_steps": decode_steps, "forks": forks, "generated_tokens": generated_tokens,
            "peak_kv_blocks": peak_kv_blocks, "preemptions": preemptions,
            "accepted_tokens_per_step": (sum(k * v for k, v in hist.items()) / thread_steps
                                         if thread_steps else 0.0),
            "accepted_length_histogram": {str(k): hist[k] for k in sorted(hist)}}


@dataclass(slots=True)
class RequestOutput:
    """A request's result: incremental (`deltas` of this step) and, when finished, complete."""

    request_id: str
    prompt: str
    prompt_ids: Sequence[int]            # the request's int32 array (`prompt_token_ids` lists it)
    deltas: list[BranchDelta]
    finished: bool
    finish_reason: FinishReason | None = None
    text: str | None = None              # the recovered text, once finished
    branches: list[dict] | None = None   # the public branch schema, once finished
    stats: dict | None = None
    error: str | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's token ids, as a new list."""
        return list(self.prompt_ids)

    def to_json(self) -> dict:
        """The public `--json` schema (a contract: keep its keys stable)."""
        d = {"prompt": self.prompt, "prompt_token_ids": self.prompt_token_ids,
             "text": self.text or "", "branches": self.branches or [], "stats": self.stats or request_stats()}
        if self.finish_reason is not None:
            d["finish_reason"] = self.finish_reason.value
        if self.error is not None:
            d["error"] = self.error
        return d
