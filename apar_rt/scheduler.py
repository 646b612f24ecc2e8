"""Iteration-level (in-flight) scheduling of APAR requests over a paged KV cache.

Pure Python plus numpy. Each step packs, under `max_num_tokens` and `max_num_seqs` (and at most
`long_prefill_token_threshold` new tokens of one sequence, when set): running branches first
(decode tokens and unfinished prefill chunks), in admission order, then waiting requests
admitted first-come-first-served while KV blocks above the watermark remain.

When blocks run out, the most recently admitted request is preempted as a whole: all its
live branches drop their blocks and go back to the front of the queue, to be recomputed
(branches re-share their common prefixes as they did after their forks). A request running
alone that still cannot grow drops its newest branch's blocks instead, to recompute that branch
later. No request is lost: only one whose single branch cannot fit the pool finishes with an
error, and every other request goes on.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from apar_rt.apar import ControlTokens, banned_tokens
from apar_rt.config import EngineConfig
from apar_rt.core import (Branch, BranchDelta, FinishReason, Request, RequestOutput, RequestStatus,
                          ScheduledSeq, SchedulerOutput, StepInput)
from apar_rt.detokenizer import open_segment
from apar_rt.kv.block_pool import BlockPool, BlockTable, KVCacheManager
from apar_rt.medusa.tree import MedusaTree
from apar_rt.sampler import make_generator
from apar_rt.stop_filter import StopFilter


FINISHED = RequestStatus.FINISHED
_UPDATE_FAILED = "internal error while updating this request"


@dataclass(slots=True)
class _Replayable:
    """A step the next one may replay (`Scheduler._replay_decodes`): its output, its sequences'
    block tables (the same objects while it stays replayable), and the tokens `update` appended,
    one per sequence (None until then)."""

    out: SchedulerOutput
    tables: list[BlockTable]
    next_ids: Sequence[int] | None = None


class RequestRejected(ValueError):
    """A request that can never be served as given; the message names the problem."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (EngineConfig.max_waiting): retry later. Servers answer 429."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    def __init__(self, config: EngineConfig, control: ControlTokens, *, max_model_len: int,
                 eos_token_ids: Sequence[int] = (), decode: Callable[[Sequence[int]], str] | None = None,
                 special_ids: frozenset[int] = frozenset(), tree: MedusaTree | None = None,
                 incremental_text: bool = True, stop_filter: StopFilter | None = None, byte_table=None) -> None:
        """
        Args:
            config: budgets and APAR mode.
            control: [Fork]/[Child] ids (None entries: the model never forks).
            max_model_len: the length cap (prompt once plus every branch's tokens), and the
                most positions any one branch may use.
            eos_token_ids: tokens that end a branch.
            decode: detokenizer (skipping special tokens); needed for stop strings.
            special_ids: token ids that render as nothing (for stop-string text).
            tree: the Medusa draft tree; a decoding branch with a draft then feeds its whole tree.
            incremental_text: decode stop-string text incrementally (False: in full each token, for
                tokenizers whose clean-up rules reach across tokens).
            stop_filter: tells which tokens could complete a stop string (`apar_rt.stop_filter`);
                the text check runs only after those. None: after every token.
            byte_table: the tokenizer's byte table (`apar_rt.model.byte_table`), if it has one:
                stop-string text is then read from it (`detokenizer.open_segment`).
        """
        self.config = config
        # most new tokens of one sequence in a step: a long prompt prefills in chunks of this
        self.chunk_cap = config.long_prefill_token_threshold or config.max_num_tokens
        self.control = control
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        # tokens after which `_append` may end a branch or fork it, whatever the request's
        # parameters: `update` appends any other token to a request's lone plain sequence inline
        self._eventful = self.eos_token_ids | {t for t in (control.fork,) if t is not None}
        self.decode = decode
        self.special_ids = special_ids
        self.incremental_text = incremental_text
        self.stop_filter = stop_filter
        self.byte_table = byte_table
        self.num_stop_checks = 0      # stop-string text checks run (the filter skips the others)
        self.tree = tree
        if tree is not None:   # the tree's step buffers, built once
            self._tree_mask = np.asarray(tree.mask, bool)
            self._tree_depth_list = [int(d) for d in tree.depths]
            # per node, the index into a tree's reserved slots (root + depth) where the step writes
            # its K/V: its depth on the tree's first path, -1 (not written) elsewhere
            first = set(tree.first_path)
            self._tree_slot_index = [int(d) if i in first else -1 for i, d in enumerate(tree.depths)]
        self.pool = BlockPool(config.num_blocks, config.block_size)
        self.kv = KVCacheManager(self.pool)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_forks = 0
        self._watermark_blocks = int(config.watermark * self.pool.capacity)
        self._causal = np.ones((1, 1), bool)
        self._banned: dict[tuple, tuple[int, ...]] = {}
        self._run_ends: dict[tuple, frozenset[int]] = {}   # tokens that end an accepted run (`_run_length`)
        # the last step, while the next may be packed from it (`_replay_decodes`); None once
        # anything but one token per sequence changed (a fork, a finish, freed blocks, drafts)
        self._replay: _Replayable | None = None

    # ---- requests in and out -------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a request; raises RequestRejected if it can never be served."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty (0 tokens)")
        if n >= self.max_model_len:
            raise RequestRejected(f"the prompt has {n} tokens, but the model's context is {self.max_model_len} "
                                  "tokens (it must leave room for at least one new token)")
        need = _cdiv(n + 1, self.config.block_size)
        if need > self.pool.capacity:
            raise RequestRejected(
                f"the KV cache is too small for this request: its prompt needs {need} blocks of "
                f"{self.config.block_size} tokens, but --num-blocks {self.config.num_blocks} gives "
                f"{self.pool.capacity} usable blocks (block 0 is reserved)")
        limit = self.config.max_waiting
        if limit and len(self.waiting) >= limit:
            raise EngineOverloaded(f"the server is at capacity: {len(self.waiting)} requests are already waiting "
                                   f"to be scheduled (--max-waiting {limit}); retry later")
        req.budget = min(req.params.max_tokens, self.max_model_len - n)
        if req.params.stop and self.stop_filter is not None:
            req.stop_verdicts = self.stop_filter.verdicts(req.params.stop)
        self.waiting.append(req)

    def abort(self, req: Request) -> bool:
        """Finish a request as aborted and free its blocks; False if it was already finished."""
        if req.finished:
            return False
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._finish_request(req, FinishReason.ABORT)
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and reserve their KV slots."""
        if self._replay is not None and self._replay.next_ids is not None and not self.waiting:
            out = self._replay_decodes(self._replay)
            if out is not None:
                return out
        self._replay = None
        out = SchedulerOutput(seqs=[], step=None)
        budget = self.config.max_num_tokens
        max_seqs = self.config.max_num_seqs
        seqs = out.seqs                              # ScheduledSeq per branch, in packing order
        copies: list[tuple[int, int]] = []           # copy-on-write block copies to run first
        # Fairness: while several requests want seats, each first gets at most an equal share of
        # max_num_seqs (one wide APAR tree cannot take them all); seats left over go round again.
        contenders = len(self.running) + len(self.waiting)
        share = max_seqs if contenders <= 1 else max(1, max_seqs // contenders)

        capped = False     # a request had more branches to run than its share: seats may go round again
        tree_on = self.tree is not None
        append_in_place = self.kv.append_in_place
        i = 0
        while i < len(self.running):
            req = self.running[i]
            got_any = blocked = False
            seats = 0
            for b in self._schedulable(req):
                if budget == 0 or len(seqs) >= max_seqs:
                    break
                if seats >= share:
                    capped = True
                    break
                if tree_on and b.draft is not None:
                    n, n_slots, tree = self._plan(b, budget)
                else:   # _plan without a draft
                    n = n_slots = min(b.prefix_len + len(b.token_ids) - b.table.num_tokens, budget, self.chunk_cap)
                    tree = False
                table = b.table
                slot = append_in_place(table) if n_slots == 1 else -1
                if slot >= 0:
                    slots = [slot]
                else:
                    res = self.kv.append(table, n_slots)
                    if res is None:
                        res = self._reserve(req, b, n_slots, out)
                        if res is None:      # this branch waits; a sibling may still fit
                            blocked = True
                            continue
                    elif res.new_blocks:
                        self._took_blocks(req, res.new_blocks)
                    if res.copies:
                        copies += res.copies
                    slots = res.slots
                seqs.append(ScheduledSeq(req, b, n, slots,
                                         tree or table.num_tokens == b.prefix_len + len(b.token_ids), tree))
                budget -= n
                seats += 1
                got_any = True
            if blocked and not got_any:
                # Not one block for it, and every later request is already preempted.
                if len(self.running) > 1:
                    self._preempt(req, out)
                elif not self._shed_branch(req):
                    self.fail(req, self._too_big_message(req), out)
                continue
            i += 1

        while self.waiting and budget > 0 and len(seqs) < max_seqs:
            req = self.waiting[0]
            need = self._blocks_to_resume(req)
            if need > self.pool.capacity:
                # a preempted APAR request whose live branches together outgrow the pool (alone, it
                # shed branches as it grew): it resumes once the pool is empty, its branches taking
                # what fits, as it ran before. Only one whose first branch cannot fit fails.
                if self._least_blocks_to_resume(req) > self.pool.capacity:
                    self.waiting.popleft()
                    self.fail(req, self._too_big_message(req), out)
                    continue
                need = self.pool.capacity
            if need + self._watermark_blocks > self.pool.num_free and (self.running or seqs):
                break
            if need > self.pool.num_free:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            ready = self._schedulable(req)
            capped = capped or len(ready) > share
            for b in ready[:share]:
                if budget == 0 or len(seqs) >= max_seqs:
                    break
                n = min(b.num_uncomputed, budget, self.chunk_cap)
                res = self.kv.append(b.table, n)
                if res is None:
                    break
                self._took_blocks(req, res.new_blocks)
                copies += res.copies
                seqs.append(ScheduledSeq(req, b, n, res.slots, b.table.num_tokens == b.context_len))
                budget -= n

        if capped and budget > 0 and len(seqs) < max_seqs:
            self._fill_seats(seqs, copies, budget)

        if seqs:
            out.step = self._pack(seqs, copies)
            step = out.step
            if (not out.preempted and not out.failed
                    and step.num_tokens == len(seqs) == len(step.logits_indices)):
                # one token per sequence (no draft tree), each sampled: the next step may replay it
                # (unless drafts come after it: `drafts_made`)
                self._replay = _Replayable(out, [s.branch.table for s in seqs])
                out.replayable = True
                out.feeds_control = self._feeds_control(step.input_ids.tolist())
        return out

    def _replay_decodes(self, last: _Replayable) -> SchedulerOutput | None:
        """The step after `last` when nothing changed but one new token per sequence: the same
        sequences, one position further, packed from `last`'s arrays instead of sequence by
        sequence (the steady state of a decode batch; vLLM keeps a persistent batch for
        the same reason). It is the step `schedule` would pack, whose choices follow from the
        running requests' schedulable branches, their order, the free blocks, their Medusa drafts
        and the waiting queue alone: `last` changed none of them but by one token a sequence (it
        preempted nobody, and no branch got a draft), no request waits, and whatever else would
        (a child that joins, a finish, a preemption, freed blocks, drafts) dropped `_replay`. A
        fork whose child waits for its parent's [Fork] K/V (`_fork`) adds no schedulable branch
        until the child takes its donor's blocks (`_fork_from_donors`), which drops `_replay`.
        Branches `last` left out (max_num_seqs, fair shares, no block) are left out again.

        Each new token is `last.next_ids`' (what `update` appended). Only the KV slots are reserved
        one sequence at a time, in one pass over `last.tables` (`append_in_place_each`); a sequence
        whose token starts a block (or must copy a shared one) takes it from the pool. None, with
        nothing reserved, when the pool has too few free blocks for those (`schedule` then
        preempts).

        The returned step's `block_tables` is `last`'s array, updated in place (a backend reads a
        step's inputs before the next is scheduled)."""
        prev = last.out.step
        seqs = last.out.seqs
        slots, short = self.kv.append_in_place_each(last.tables)
        copies: list[tuple[int, int]] = []
        tables = prev.block_tables
        if short:
            if len(short) > self.pool.num_free:
                self._undo_in_place(last.tables, slots)
                return None
            width = max(len(last.tables[i].ids) + 1 for i in short)
            if width > tables.shape[1]:
                wider = np.zeros((tables.shape[0], width), np.int32)
                wider[:, :tables.shape[1]] = tables
                tables = wider
            for i in short:
                table = last.tables[i]
                res = self.kv.append(table, 1)     # one block each: there are enough
                self._took_blocks(seqs[i].request, res.new_blocks)
                if res.copies:
                    copies += res.copies
                slots[i] = res.slots[0]
                # one token changes only the table's last entry (a new block, or a copy of the
                # shared last one): the row's other entries hold already
                ids = table.ids
                tables[i, len(ids) - 1] = ids[-1]
        out = SchedulerOutput(seqs=seqs, step=StepInput(
            input_ids=np.asarray(last.next_ids, np.int32), positions=prev.positions + 1, block_tables=tables,
            context_lens=prev.context_lens + 1, query_start=prev.query_start, mask=prev.mask,
            slot_mapping=np.asarray(slots, np.int32), logits_indices=prev.logits_indices, block_copies=copies),
            replayable=True, replayed=True, feeds_control=self._feeds_control(last.next_ids))
        self._replay = _Replayable(out, last.tables)
        return out

    @staticmethod
    def _undo_in_place(tables: Sequence[BlockTable], slots: Sequence[int]) -> None:
        """Give back the in-place slots `_replay_decodes` reserved for `tables` (slot -1: none)."""
        for table, slot in zip(tables, slots):
            if slot >= 0:
                table.num_tokens -= 1

    def drafts_made(self) -> None:
        """Branches of the last step got Medusa drafts: the next step verifies them (a plan of
        draft trees), so it is not the last one replayed."""
        self._replay = None

    def _feeds_control(self, input_ids: list[int]) -> bool:
        """Whether a step's tokens hold [Fork] or [Child] (after which a branch's bans differ)."""
        return any(t is not None and t in input_ids for t in (self.control.fork, self.control.child))

    def _fill_seats(self, seqs: list[ScheduledSeq], copies: list[tuple[int, int]], budget: int) -> None:
        """Second round: seats the fair shares left free go to the running requests' other
        branches, in admission order, without preempting anyone. Only branches the first round
        left out for their request's share can be taken here (a branch it left out for want of
        blocks finds none now), so it runs only when a share capped a request."""
        taken = {id(s.branch) for s in seqs}
        for req in self.running:
            for b in self._schedulable(req):
                if budget == 0 or len(seqs) >= self.config.max_num_seqs:
                    return
                if id(b) in taken or b.num_uncomputed == 0:
                    continue
                n, n_slots, tree = self._plan(b, budget)
                res = self.kv.append(b.table, n_slots)
                if res is None:
                    return
                self._took_blocks(req, res.new_blocks)
                copies += res.copies
                seqs.append(ScheduledSeq(req, b, n, res.slots, tree or b.table.num_tokens == b.context_len, tree))
                budget -= n

    @staticmethod
    def _took_blocks(req: Request, n: int) -> None:
        """n more blocks now back `req` (its peak is kept for its stats)."""
        req.kv_blocks += n
        if req.kv_blocks > req.peak_kv_blocks:
            req.peak_kv_blocks = req.kv_blocks

    def _plan(self, b: Branch, budget: int) -> tuple[int, int, bool]:
        """(new tokens, slots to reserve, is a draft tree) for branch b within the token budget."""
        tree = self.tree
        if (tree is not None and b.draft is not None and b.num_uncomputed == 1 and budget >= tree.size
                and b.context_len + tree.depth < self.max_model_len):
            return tree.size, 1 + tree.depth, True
        b.draft = None
        n = min(b.num_uncomputed, budget, self.chunk_cap)
        return n, n, False

    def _reserve(self, req: Request, b: Branch, n: int, out: SchedulerOutput):
        """Slots for n tokens of branch b, preempting later requests if needed.

        Returns None when only `req` itself is left to preempt: the branch must wait.
        """
        while True:
            res = self.kv.append(b.table, n)
            if res is not None:
                self._took_blocks(req, res.new_blocks)
                return res
            victim = self.running[-1]
            if victim is req:
                return None
            self._preempt(victim, out)

    @staticmethod
    def _schedulable(req: Request) -> list[Branch]:
        branches = req.branches
        if len(branches) == 1:   # no fork yet (and so no branch waits for a donor)
            return branches if branches[0].finish_reason is None else []
        donors = req.prefix_donors
        if donors:
            return [b for b in req.branches if b.finish_reason is None and b.id not in donors]
        return [b for b in req.branches if b.finish_reason is None]

    def _blocks_to_resume(self, req: Request) -> int:
        """Blocks a (re)admitted request needs for all its live branches' contexts."""
        bs = self.config.block_size
        need = 0
        for b in req.live_branches():
            need += self._blocks_for_context(b)
            if b.id in req.prefix_donors:
                need -= req.prefix_donors[b.id][1] // bs
        return need

    def _least_blocks_to_resume(self, req: Request) -> int:
        """The fewest blocks that one live branch of `req` waiting for no donor needs for its
        context: what the request needs to make any progress."""
        return min((self._blocks_for_context(b) for b in req.live_branches() if b.id not in req.prefix_donors),
                   default=0)

    def _blocks_for_context(self, b: Branch) -> int:
        """Blocks branch b needs beyond those it holds for its context and one more token."""
        return _cdiv(b.context_len + 1, self.config.block_size) - len(b.table.block_ids)

    def _best_donor(self, b: Branch, candidates: Sequence[Branch]) -> tuple[int, int] | None:
        """(donor id, shared tokens) of the candidate sharing the longest context prefix with b,
        when that is at least a block; b keeps at least one token of its own to compute."""
        ctx = b.context()
        best = None
        for a in candidates:
            ctx_a = a.context()
            n, limit = 0, min(len(ctx_a), len(ctx) - 1)
            while n < limit and ctx_a[n] == ctx[n]:
                n += 1
            if n >= self.config.block_size and (best is None or n > best[1]):
                best = (a.id, n)
        return best

    def _plan_shared_recompute(self, req: Request) -> None:
        """Pair each live branch with an earlier one it shares a context prefix with, so that
        recompute after a preemption shares blocks as the original forks did."""
        live = req.live_branches()
        req.prefix_donors = {}
        for i, b in enumerate(live):
            donor = self._best_donor(b, live[:i])
            if donor is not None:
                req.prefix_donors[b.id] = donor

    def _shed_branch(self, req: Request) -> bool:
        """Free the newest block-holding branch of a request that cannot grow at all, so its
        siblings go on; the branch is recomputed later, re-sharing a sibling's computed prefix
        when it can. False when fewer than two branches hold blocks (nothing to gain)."""
        holders = [b for b in req.live_branches() if b.table.block_ids]
        if len(holders) < 2:
            return False
        b = holders[-1]
        self._free(req, b)
        b.draft = None
        req.num_preemptions += 1
        self.num_preemptions += 1
        donor = self._best_donor(b, holders[:-1])
        if donor is not None:
            did, n = donor
            req.prefix_donors[b.id] = (did, min(n, req.branches[did].table.num_tokens))
        return True

    def _fork_from_donors(self, req: Request) -> None:
        """Branches whose donor has computed the shared prefix take its blocks now. (A donor that
        ends first hands over what it has in `_finish_branch`, so every donor here is live.)"""
        for bid, (did, n) in list(req.prefix_donors.items()):
            donor = req.branches[did]
            if did not in req.prefix_donors and donor.table.num_tokens >= n:
                self._replay = None
                req.branches[bid].table = self.kv.fork(donor.table, n)
                del req.prefix_donors[bid]

    def _too_big_message(self, req: Request) -> str:
        live = req.live_branches()
        held = len(req.held_blocks())
        need = self._blocks_to_resume(req)
        return (f"the KV cache is too small for this request: its {len(live)} live branch(es) hold {held} "
                f"blocks and need {need} more of {self.config.block_size} tokens, but --num-blocks "
                f"{self.config.num_blocks} gives {self.pool.capacity} usable blocks; raise --num-blocks or "
                f"lower --max-tokens")

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        for b in req.branches:
            b.draft = None
            self._free(req, b)
        req.status = RequestStatus.WAITING
        self._plan_shared_recompute(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _free(self, req: Request, b: Branch) -> None:
        self._replay = None
        if b.table.block_ids:
            req.kv_blocks -= len(self.kv.free(b.table))

    def fail(self, req: Request, message: str, out: SchedulerOutput | None = None) -> None:
        """Finish `req` with an error (its blocks are freed); listed in `out.failed` if given,
        so that `update` reports it. The other requests are untouched."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.error = message
        self._finish_request(req, FinishReason.ERROR)
        if out is not None and req not in out.failed:
            out.failed.append(req)

    def _pack(self, seqs: list[ScheduledSeq], copies: list[tuple[int, int]]) -> StepInput:
        """The step's packed inputs. Per-token values are gathered in Python lists and converted
        once; block tables are copied into one zeroed (null-block padded) matrix from each table's
        int32 mirror, one copy each, into memory allocated once."""
        B = len(seqs)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        ctx: list[int] = []
        qs = [0]
        logits_idx: list[int] = []
        max_blocks = max(len(s.branch.table.ids) for s in seqs)
        flat = array("i", [0]) * (B * max_blocks)   # [B, max_blocks]: row i is seqs[i]'s table, 0-padded
        row = 0
        blocked: list[tuple[int, int, bool]] = []   # (first token, tokens, is a tree) of multi-token sequences
        t = 0
        max_q = 1
        for s in seqs:
            b, n = s.branch, s.num_new
            ids = b.table.ids
            flat[row:row + len(ids)] = ids
            row += max_blocks
            if s.tree:   # root (the last sampled token) + draft nodes: the first path's K/V are written
                # at their depths' slots (kept where the accepted path runs along it), the others'
                # only once accepted (`Engine._after_medusa_step`)
                start = b.prefix_len + len(b.token_ids) - 1
                input_ids.append(b.token_ids[-1])
                input_ids.extend(b.draft)
                positions.extend([start + d for d in self._tree_depth_list])
                reserved = s.slots
                slots.extend([reserved[d] if d >= 0 else -1 for d in self._tree_slot_index])
                logits_idx.extend(range(t, t + n))
                blocked.append((t, n, True))
            else:
                start = b.table.num_tokens - n
                if n == 1:
                    p = b.prefix_len
                    input_ids.append(b.token_ids[start - p] if start >= p else b.prefix[start])
                    positions.append(start)
                else:
                    input_ids.extend(b.context_slice(start, start + n))
                    positions.extend(range(start, start + n))
                    blocked.append((t, n, False))
                slots.extend(s.slots)
                if s.samples:
                    logits_idx.append(t + n - 1)
            ctx.append(start)
            t += n
            qs.append(t)
            if n > max_q:
                max_q = n
        T = t
        tables = (np.frombuffer(flat, np.int32) if flat.itemsize == 4 else np.asarray(flat, np.int32))
        tables = tables.reshape(B, max_blocks)
        mask = np.zeros((T, max_q), bool)
        mask[:, 0] = True                    # a decode token sees itself
        if blocked:
            if self._causal.shape[0] < max_q:     # built once per size, not per step
                self._causal = np.tril(np.ones((max_q, max_q), bool))
            for t0, n, tree in blocked:
                mask[t0:t0 + n, :n] = self._tree_mask if tree else self._causal[:n, :n]
        return StepInput(input_ids=np.asarray(input_ids, np.int32), positions=np.asarray(positions, np.int32),
                         block_tables=tables, context_lens=np.asarray(ctx, np.int32),
                         query_start=np.asarray(qs, np.int32), mask=mask,
                         slot_mapping=np.asarray(slots, np.int32),
                         logits_indices=np.asarray(logits_idx, np.int32), block_copies=copies)

    # ---- after the step ------------------------------------------------------------------

    def mode(self, req: Request) -> str:
        """The request's decoding mode: its own, else the engine's."""
        return req.params.mode or self.config.mode

    def banned(self, req: Request, branch: Branch, last_token: int, out: SchedulerOutput) -> tuple[int, ...]:
        """Token ids `branch` of `req` may not sample after `last_token` in the step `out`."""
        step_full = self.config.ban_fork_when_full and len(out.seqs) >= self.config.max_num_seqs
        mode = req.params.mode or self.config.mode
        ctrl = self.control
        # banned_tokens depends on these alone: memoised (a step asks once per sequence)
        key = (last_token == ctrl.fork, last_token == ctrl.child, branch.depth >= self.config.max_depth, mode,
               step_full)
        got = self._banned.get(key)
        if got is None:
            got = self._banned[key] = tuple(banned_tokens(last_token, branch.depth, ctrl, mode=mode,
                                                          max_depth=self.config.max_depth, step_full=step_full))
        return got

    def update(self, out: SchedulerOutput, results: Sequence[int | Sequence[int]],
               on_error: Callable[[Request, Exception], str] | None = None
               ) -> tuple[list[RequestOutput], list[Request], list[int]]:
        """Append each sampling sequence's new tokens (in `out.seqs` order), fork, and finish.
        Returns each request's output of the step (its branches' new tokens, `finished`), the
        requests, in the same order, and the indices of the finished ones; the engine completes
        a finished request's output (its finish_reason, error, text, branches and stats).

        A plain sequence brings one token (an int in `results`). A draft tree brings its accepted
        run plus the bonus token; the run is cut after the first end token (kept; a [Fork] in it
        forks there and the run goes on, `_run_length`), and to the request's remaining max_tokens.
        For a tree, `s.accepted` is set to the tokens kept and the table is cut to the root plus
        the accepted nodes, whose K/V the engine then writes.

        A request's lone plain sequence is completed as its token is appended; a token that ends,
        forks and fills nothing (the steady decode step) is appended inline, without `_append`.

        A request whose update raises fails alone, with the message `on_error(req, exc)` gives.
        A step still replayable afterwards (nothing but one token per sequence changed) keeps
        `results` as its next step's input ids (`_replay_decodes`).
        """
        updates: list[RequestOutput] = []           # each request's output, in order of its first sequence
        reqs: list[Request] = []                    # their requests
        per_req: dict[int, RequestOutput] = {}      # the outputs of the requests the second pass completes
        checked: list[int] = []                     # indices of the outputs the second pass completes
        finished: list[int] = []                    # indices of the finished ones
        donors = {id(s.request): s.request for s in out.seqs if s.request.prefix_donors}
        for req in donors.values():
            self._fork_from_donors(req)
        results_iter = iter(results)
        eventful = self._eventful
        for s in out.seqs:
            if not s.samples:
                continue
            tokens = next(results_iter)
            req, b = s.request, s.branch
            if req.status is FINISHED or b.finish_reason is not None:
                continue
            if type(tokens) is int and len(req.branches) == 1:
                # a request's lone plain sequence, with its one token: completed here
                upd = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                                    [BranchDelta(b.id, b.parent, b.fork_index, [], False)], False)
                updates.append(upd)
                reqs.append(req)
                s.accepted = 1
                try:
                    p = req.params
                    n = req.num_generated + 1
                    if (tokens not in eventful and tokens not in p.stop_token_ids and n < req.budget
                            and (not p.stop or ((known := req.stop_verdicts) is not None and tokens < len(known)
                                                and known[tokens] == 1))):
                        # `_append` of a token that ends nothing, forks nothing and fills nothing (no
                        # stop string can complete it; below the budget, which leaves the root's
                        # context below max_model_len)
                        b.token_ids.append(tokens)
                        req.num_generated = n
                        b.subtree_tokens += 1
                        upd.deltas[0].new_token_ids.append(tokens)
                        req.decode_steps += 1
                        continue
                    self._append(req, b, tokens, upd)
                except Exception as e:
                    self.fail(req, on_error(req, e) if on_error else _UPDATE_FAILED, out)
                    checked.append(len(updates) - 1)
                    continue
                if len(req.branches) == 1:   # one branch, one token, which `_append` checked: complete
                    req.decode_steps += 1
                    if req.status is FINISHED:
                        upd.finished = True
                        finished.append(len(updates) - 1)
                else:   # it forked: the second pass checks its branches against the budget
                    checked.append(len(updates) - 1)
                continue
            # a draft tree's run, or one of a request's several branches: the second pass completes it
            upd = per_req.get(id(req))
            if upd is None:   # the request's first sequence this step (a plain one's delta comes first)
                upd = per_req[id(req)] = RequestOutput(
                    req.request_id, req.prompt, req.prompt_token_ids,
                    [BranchDelta(b.id, b.parent, b.fork_index, [], False)] if type(tokens) is int else [], False)
                updates.append(upd)
                reqs.append(req)
                checked.append(len(updates) - 1)
            try:
                if type(tokens) is int:
                    s.accepted = 1
                    self._append(req, b, tokens, upd)
                else:
                    self._update_seq(s, req, b, list(tokens), upd)
            except Exception as e:
                self.fail(req, on_error(req, e) if on_error else _UPDATE_FAILED, out)
        for i in checked:
            upd, req = updates[i], reqs[i]
            if upd.deltas:
                req.decode_steps += 1
            if req.status is not FINISHED:
                if len(req.branches) > 1 and req.num_generated >= req.budget:
                    # Other branches grew this step: a branch whose next token could only land
                    # past the budget in reading order has nothing more to give. (A request that
                    # never forked was checked as its one branch grew; below the budget in
                    # tokens generated, no branch is: see `_append`.)
                    for b in req.live_branches():
                        if req.next_position(b) >= req.budget:
                            self._finish_branch(req, b, FinishReason.LENGTH, upd)
                if req.status is not FINISHED and not req.num_live:
                    self._finish_request(req, FinishReason.STOP)
            if req.status is FINISHED:
                upd.finished = True
                finished.append(i)
        if out.failed:   # requests failed this step before they had an output
            have = {id(req) for req in reqs}
            for req in out.failed:
                if id(req) not in have:
                    finished.append(len(updates))
                    updates.append(RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [], True))
                    reqs.append(req)
        replay = self._replay
        if replay is not None and replay.out is out:   # still replayable: each sequence took one token
            replay.next_ids = results
        return updates, reqs, finished

    def _update_seq(self, s: ScheduledSeq, req: Request, b: Branch, tokens: list[int],
                    upd: RequestOutput) -> None:
        if s.tree:
            tokens = tokens[:self._run_length(req, b, tokens)]
            req.kv_blocks -= len(self.kv.truncate(b.table, b.context_len - 1 + len(tokens)))
        s.accepted = len(tokens)
        if s.tree:   # Medusa's acceptance counts draft-tree steps only
            req.accepted_lengths[len(tokens)] = req.accepted_lengths.get(len(tokens), 0) + 1
        for tok in tokens:
            self._append(req, b, tok, upd)
            if b.finished or req.finished:
                break

    def _run_length(self, req: Request, b: Branch, tokens: Sequence[int]) -> int:
        """Tokens of an accepted run to keep: through the first end token, and none that would land
        past the request's budget in reading order. A [Fork] inside the run does not cut it: the
        child forks as `_append` reaches it, sharing the blocks through [Fork] (an accepted node: its
        K/V are in the pool before the next step), and the thread keeps the tokens after it, which
        plain decoding gives it too (greedy verification is lossless). `_append` checks the budget
        token by token, since the child's tokens come first in reading order."""
        p = req.params
        key = (p.stop_token_ids, p.ignore_eos)
        ends = self._run_ends.get(key)
        if ends is None:   # memoised: a tree step asks once per thread
            ends = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            if len(self._run_ends) > 64:
                self._run_ends.clear()
            ends = self._run_ends[key] = frozenset(ends)
        n = len(tokens)
        for i, t in enumerate(tokens):
            if t in ends:
                n = i + 1
                break
        return max(1, min(n, req.budget - req.next_position(b)))

    def _delta(self, upd: RequestOutput, b: Branch) -> BranchDelta:
        for d in upd.deltas:
            if d.branch_id == b.id:
                return d
        d = BranchDelta(b.id, b.parent, b.fork_index, [], False)
        upd.deltas.append(d)
        return d

    def _append(self, req: Request, b: Branch, tok: int, upd: RequestOutput) -> None:
        """Append one token to branch b, then end it or fork.

        The budget rule: the request's output is its first `req.budget` tokens in reading order.
        `next_position` only grows as other branches grow, so a branch ended (or a fork skipped)
        because its next token would land at or past the budget loses nothing the output could
        hold, under any schedule. A branch also ends when its own context fills max_model_len.
        A next position counts tokens that exist, so it is below `req.num_generated`: while that
        is below the budget, no position is computed.
        """
        p = req.params
        b.token_ids.append(tok)
        req.num_generated += 1
        c = b
        c.subtree_tokens += 1   # _count(req, b, 1)
        while c.parent is not None:
            c = req.branches[c.parent]
            c.subtree_tokens += 1
        deltas = upd.deltas
        d = deltas[-1] if deltas and deltas[-1].branch_id == b.id else self._delta(upd, b)
        d.new_token_ids.append(tok)
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish_branch(req, b, FinishReason.STOP, upd)
            return
        if p.stop:
            known = req.stop_verdicts   # 1: the filter found this token cannot complete a stop string
            if (known is None or tok >= len(known) or known[tok] != 1) and self._hit_stop_string(b, p.stop):
                self._finish_branch(req, b, FinishReason.STOP, upd)
                return
        budget = req.budget
        if (tok == self.control.fork and self.control.child is not None and self.mode(req) == "apar"
                and b.context_len + 1 < self.max_model_len
                and (req.num_generated < budget or req.next_position(b) < budget)):
            child = self._fork(req, b, upd)
            if ((req.num_generated >= budget and req.next_position(child) >= budget)
                    or child.context_len >= self.max_model_len):
                self._finish_branch(req, child, FinishReason.LENGTH, upd)
        if ((req.num_generated >= budget
             and (b.subtree_tokens if b.parent is None else req.next_position(b)) >= budget)
                or b.prefix_len + len(b.token_ids) >= self.max_model_len):
            self._finish_branch(req, b, FinishReason.LENGTH, upd)

    @staticmethod
    def _count(req: Request, b: Branch, n: int) -> None:
        """n tokens appended to branch b: update the subtree counters up to the root."""
        req.num_generated += n
        while True:
            b.subtree_tokens += n
            if b.parent is None:
                return
            b = req.branches[b.parent]

    def _hit_stop_string(self, b: Branch, stops: Sequence[str]) -> bool:
        """Whether the branch's newest token completed a stop string in its text (apar.branch_text);
        on a hit, `b.stop_text_len` is where the first stop string in that text begins.

        The text is kept by an incremental detokenizer over the whole branch (the same text as
        `branch_text`, at a cost set by the new tokens), and only its tail is searched: a stop string
        that the newest token completed ends after the text that was already final before it.
        With a stop filter, the text waits for a token that could complete one; the tokens before
        it (none of which could) are decoded with it, and their text is in that tail too."""
        if self.decode is None:
            return False
        if self.stop_filter is not None and not self.stop_filter.may_complete(b.token_ids[-1], stops):
            return False
        self.num_stop_checks += 1
        text = b.stop_text
        if text is None:
            text = b.stop_text = open_segment(b, 0, self.decode, self.special_ids, self.incremental_text,
                                              self.byte_table)
        final, version = text.committed_len, text.version
        text.advance(len(b.token_ids))
        need = max(len(s) for s in stops)
        tail = text.slice(max(0, final - need) if text.version == version else 0, len(text))
        if not any(s in tail for s in stops):
            return False
        whole = text.text()
        b.stop_text_len = min(whole.find(s) for s in stops if s in whole)
        return True

    def _fork(self, req: Request, parent: Branch, upd: RequestOutput) -> Branch:
        """A child of `parent`, which just sampled [Fork]. The child's context is the parent's through
        [Fork], then [Child]. [Fork] has no K/V yet (unless it was an accepted draft token): the
        parent computes it next step, and the child waits for that and then shares the parent's
        blocks (`_fork_from_donors`), so its first step feeds [Child] alone, a decode, rather than
        [Fork] and [Child]. (Should the parent end first, the child shares what it has.)
        A child that waits is not schedulable, so the next step holds the same sequences, one token
        further: it may be the last one replayed (`_replay_decodes`); one that joins now is not."""
        n = parent.context_len
        ready = parent.table.num_tokens >= n
        if ready:
            self._replay = None
        fork_index = len(parent.token_ids) - 1
        child = Branch(id=len(req.branches), parent=parent.id, fork_index=fork_index,
                       depth=parent.depth + 1, prefix=parent.child_prefix(len(parent.token_ids)),
                       token_ids=[self.control.child], table=self.kv.fork(parent.table, n if ready else 0),
                       generator=None if req.generator is None else
                       make_generator(req.params.seed, (*req.tree_path(parent), fork_index)))
        if not ready:
            req.prefix_donors[child.id] = (parent.id, n)
        req.branches.append(child)
        parent.children.append(child.id)
        req.num_live += 1
        self._count(req, child, 1)
        req.forks += 1
        self.num_forks += 1
        self._delta(upd, child).new_token_ids.append(self.control.child)
        return child

    def _finish_branch(self, req: Request, b: Branch, reason: FinishReason, upd: RequestOutput) -> None:
        b.finish_reason = reason
        req.num_live -= 1
        req.prefix_donors.pop(b.id, None)
        for bid, (did, n) in list(req.prefix_donors.items()):
            if did == b.id:   # b ends before it computed all the prefix they wait for: they share what it has
                req.branches[bid].table = self.kv.fork(b.table, min(n, b.table.num_tokens))
                del req.prefix_donors[bid]
        self._free(req, b)
        self._delta(upd, b).finished = True
        if not req.num_live:
            self.running.remove(req)
            req.status = RequestStatus.FINISHED
            req.finish_reason = self._request_reason(req)

    def _finish_request(self, req: Request, reason: FinishReason) -> None:
        req.prefix_donors = {}   # no branch waits any more
        for b in req.branches:
            if not b.finished:
                b.finish_reason = reason
            self._free(req, b)
        req.num_live = 0
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    @staticmethod
    def _request_reason(req: Request) -> FinishReason:
        if req.num_generated > req.budget or any(b.finish_reason == FinishReason.LENGTH for b in req.branches):
            return FinishReason.LENGTH
        return FinishReason.STOP
