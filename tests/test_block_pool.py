"""Tests for apar_rt.kv.block_pool: exact block ids and free runs, then a stateful property test.

The unit tests spell out the expected block ids by hand (vLLM style). The state machine
drives random create / append / fork / free / abort sequences against an independent
shadow model (its own set of free blocks, placed by a plain scan for runs, its own tables,
and a simulated KV store), so every block id the manager hands out is predicted, not merely
checked for consistency.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from apar_rt.kv.block_pool import NULL_BLOCK, BlockPool, BlockTable, KVCacheManager


def free_list(pool: BlockPool) -> list[int]:
    """The pool's free blocks, in id order."""
    return [b for first, last in pool.free_runs() for b in range(first, last + 1)]


# --- BlockPool ----------------------------------------------------------------------


def test_pool_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockPool(1, 4)
    with pytest.raises(ValueError):
        BlockPool(4, 0)


def test_fresh_pool_never_hands_out_null_block():
    pool = BlockPool(5, 4)
    assert pool.capacity == 4
    assert pool.num_free == 4 and pool.num_used == 0
    assert free_list(pool) == [1, 2, 3, 4]
    assert pool.allocate(4) == [1, 2, 3, 4]
    assert pool.num_free == 0 and pool.num_used == 4
    assert pool.ref_count(NULL_BLOCK) == 0
    assert pool.allocate(1) is None


def test_allocate_extends_after_then_takes_the_middle_of_the_largest_run():
    """A table's next blocks follow its last one while they are free; otherwise they come from
    the largest free run (the lowest of equal ones), from its middle unless it starts at block 1,
    so that whichever table ends before the run can still grow into it."""
    pool = BlockPool(21, 2)
    assert pool.allocate(3) == [1, 2, 3]                  # the run 1..20 starts at block 1
    assert pool.allocate(2) == [11, 12]                   # run 4..20: its middle
    assert pool.allocate(2, after=3) == [4, 5]            # right after the caller's block 3
    assert pool.allocate(2, after=12) == [13, 14]
    assert pool.free_runs() == [(6, 10), (15, 20)]
    assert pool.allocate(3, after=5) == [6, 7, 8]
    assert pool.allocate(4, after=8) == [9, 10, 17, 18]   # two after 8, the rest from 15..20's middle
    assert pool.free_runs() == [(15, 16), (19, 20)]
    assert pool.allocate(3) == [15, 16, 19]               # equal runs: the lower first, whole; then the other
    assert pool.allocate(1) == [20]
    assert pool.allocate(1) is None


def test_take_after_takes_the_next_block_only_while_it_is_free():
    """`take_after(b)` (a table's next block) takes b + 1 when free and shortens the run it starts;
    else it returns -1 and takes nothing. The shortened run is still found as the largest (its
    heap entry is keyed by its last block), and the one it ends is gone."""
    pool = BlockPool(21, 2)
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.allocate(2) == [11, 12]                   # run 4..20: its middle
    assert pool.take_after(3) == 4 and pool.ref_count(4) == 1
    assert pool.free_runs() == [(5, 10), (13, 20)]
    assert pool.take_after(2) == -1 and pool.take_after(12) == 13 and pool.take_after(20) == -1
    assert pool.free_runs() == [(5, 10), (14, 20)] and pool.num_free == 13
    for b in range(13, 19):                               # 14..19 taken from the front: 20 is left
        assert pool.take_after(b) == b + 1
    assert pool.free_runs() == [(5, 10), (20, 20)]
    assert pool.allocate(2) == [7, 8]                     # 5..10 is the largest now: its middle
    assert pool.take_after(19) == 20 and pool.free_runs() == [(5, 6), (9, 10)]
    assert pool.allocate(3) == [5, 6, 9]                  # equal runs: the lower whole, then the other
    assert pool.peak_used == 19 and pool.allocate(2) is None


def test_tables_growing_together_stay_consecutive():
    """Eight tables prefilled one after another, then decoding in turn (a block each every 4
    tokens): each keeps its blocks consecutive, where handing out blocks in order would have
    interleaved the eight block by block."""
    pool = BlockPool(200, 4)
    kv = KVCacheManager(pool)
    tables = [BlockTable() for _ in range(8)]
    for t in tables:
        kv.append(t, 10)
    for _ in range(40):
        for t in tables:
            kv.append(t, 1)
    for t in tables:
        assert len(t.block_ids) == 13
        assert t.block_ids == list(range(t.block_ids[0], t.block_ids[0] + 13)), t.block_ids
    assert pool.num_used == 8 * 13


def test_freed_blocks_merge_into_runs():
    pool = BlockPool(10, 2)
    assert pool.allocate(9) == list(range(1, 10))
    assert pool.decref([4, 6]) == [4, 6]
    assert pool.free_runs() == [(4, 4), (6, 6)]
    assert pool.decref([5]) == [5]
    assert pool.free_runs() == [(4, 6)]
    assert pool.decref([9, 1]) == [9, 1]
    assert pool.free_runs() == [(1, 1), (4, 6), (9, 9)]
    assert pool.allocate(2) == [4, 5]                     # the largest run, 4..6: its middle is its start
    assert pool.allocate(1, after=8) == [9]
    assert pool.num_free == 2 and free_list(pool) == [1, 6]


def test_allocate_none_takes_nothing():
    pool = BlockPool(4, 2)
    assert pool.allocate(1) == [1]
    before = (free_list(pool), [pool.ref_count(b) for b in range(4)], pool.peak_used)
    assert pool.allocate(3) is None
    assert (free_list(pool), [pool.ref_count(b) for b in range(4)], pool.peak_used) == before
    assert pool.allocate(0) == []
    assert pool.allocate(2) == [2, 3]


def test_double_free_and_null_free_raise():
    pool = BlockPool(4, 2)
    (b,) = pool.allocate(1)
    assert pool.decref([b]) == [b]
    with pytest.raises(RuntimeError):
        pool.decref([b])
    with pytest.raises(RuntimeError):
        pool.decref([NULL_BLOCK])
    with pytest.raises(RuntimeError):
        pool.decref([3])  # never allocated
    with pytest.raises(RuntimeError):
        pool.incref([NULL_BLOCK])
    with pytest.raises(RuntimeError):
        pool.incref([b])  # free again
    assert free_list(pool) == [1, 2, 3]


def test_shared_block_freed_on_last_reference():
    pool = BlockPool(3, 2)
    assert pool.allocate(1) == [1]
    pool.incref([1])
    pool.incref([1])
    assert pool.ref_count(1) == 3
    assert pool.decref([1]) == []
    assert pool.decref([1]) == []
    assert pool.num_free == 1
    assert pool.decref([1]) == [1]
    assert free_list(pool) == [1, 2] and pool.free_runs() == [(1, 2)]


def test_peak_used():
    pool = BlockPool(8, 2)
    a = pool.allocate(3)
    assert pool.peak_used == 3
    pool.decref(a)
    assert pool.peak_used == 3
    pool.allocate(2)
    assert pool.peak_used == 3
    pool.allocate(4)
    assert pool.peak_used == 6
    assert pool.allocate(5) is None
    assert pool.peak_used == 6


# --- KVCacheManager -----------------------------------------------------------------


def test_append_slots_and_blocks():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    t = BlockTable()
    assert kv.blocks_needed(t, 6) == 2
    r = kv.append(t, 6)
    assert t.block_ids == [1, 2] and t.num_tokens == 6
    assert r.slots == [4, 5, 6, 7, 8, 9]
    assert r.copies == [] and r.new_blocks == 2
    # Fill the partial block, then spill into a new one.
    assert kv.blocks_needed(t, 3) == 1
    r = kv.append(t, 3)
    assert r.slots == [10, 11, 12] and r.new_blocks == 1 and r.copies == []
    assert t.block_ids == [1, 2, 3] and t.num_tokens == 9
    # Zero tokens: nothing at all.
    r = kv.append(t, 0)
    assert r.slots == [] and r.copies == [] and r.new_blocks == 0
    assert pool.peak_used == 3


def test_append_in_place_only_into_an_own_partly_filled_last_block():
    """The decode fast path: one token into the table's own partly filled last block gives its
    slot; an empty table, a full last block or a shared one gives -1 and leaves all as it was."""
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    t = BlockTable()
    assert kv.append_in_place(t) == -1 and t.num_tokens == 0 and t.block_ids == []
    kv.append(t, 6)                                   # [1, 2]: block 2 holds positions 4, 5
    assert kv.append_in_place(t) == 2 * 4 + 2 and t.num_tokens == 7
    assert kv.append_in_place(t) == 2 * 4 + 3 and t.num_tokens == 8
    free_before = free_list(pool)
    assert kv.append_in_place(t) == -1               # block 2 is full: a new block is append's job
    assert t.num_tokens == 8 and t.block_ids == [1, 2] and free_list(pool) == free_before
    kv.append(t, 1)                                   # block 3, position 8
    c = kv.fork(t)
    assert kv.append_in_place(t) == -1 and kv.append_in_place(c) == -1   # block 3 is shared
    assert t.num_tokens == c.num_tokens == 9 and pool.ref_count(3) == 2
    assert list(t.ids) == t.block_ids == [1, 2, 3]


def test_append_slots_follow_scattered_blocks():
    pool = BlockPool(12, 2)
    kv = KVCacheManager(pool)
    held = pool.allocate(11)
    pool.decref([held[i] for i in (1, 4, 5, 8)])   # free: 2, 5..6, 9
    t = BlockTable()
    r = kv.append(t, 7)
    assert t.block_ids == [5, 6, 2, 9]             # the largest run, then the lower of the single blocks
    assert r.slots == [10, 11, 12, 13, 4, 5, 18]


def test_append_that_does_not_fit_leaves_no_trace():
    pool = BlockPool(4, 2)
    kv = KVCacheManager(pool)
    t = BlockTable()
    kv.append(t, 3)  # blocks 1, 2

    def snapshot():
        return list(t.block_ids), t.num_tokens, free_list(pool), [pool.ref_count(b) for b in range(4)]

    before = snapshot()
    assert kv.append(t, 4) is None  # needs 2, only 1 free
    assert snapshot() == before
    assert kv.append(t, 3) is not None  # needs exactly 1
    assert t.block_ids == [1, 2, 3]


def test_fork_shares_every_block():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 10)  # blocks 1, 2, 3 (3 holds 2 tokens)
    c = kv.fork(p)
    assert c.block_ids == [1, 2, 3] and c.num_tokens == 10
    assert c.block_ids is not p.block_ids
    assert [pool.ref_count(b) for b in (1, 2, 3)] == [2, 2, 2]
    assert pool.num_used == 3
    g = kv.fork(c)
    assert [pool.ref_count(b) for b in (1, 2, 3)] == [3, 3, 3]
    assert pool.num_used == 3
    assert kv.free(g) == []
    assert g.block_ids == [] and g.num_tokens == 0
    assert [pool.ref_count(b) for b in (1, 2, 3)] == [2, 2, 2]


def test_copy_on_write_of_shared_partial_last_block():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 6)  # [1, 2], block 2 holds positions 4, 5
    c = kv.fork(p)
    assert kv.blocks_needed(c, 1) == 1
    r = kv.append(c, 1)
    # Exactly the shared partial last block is copied, into the oldest free block.
    assert r.copies == [(2, 3)]
    assert r.new_blocks == 1
    assert r.slots == [3 * 4 + 2]
    assert c.block_ids == [1, 3] and p.block_ids == [1, 2]
    assert pool.ref_count(1) == 2 and pool.ref_count(2) == 1 and pool.ref_count(3) == 1
    # The parent now owns block 2 alone: it appends in place, no copy.
    assert kv.blocks_needed(p, 2) == 0
    r = kv.append(p, 2)
    assert r.copies == [] and r.new_blocks == 0 and r.slots == [2 * 4 + 2, 2 * 4 + 3]
    # The child's second append is in place too.
    r = kv.append(c, 1)
    assert r.copies == [] and r.slots == [3 * 4 + 3]
    # Spilling over a shared full block 1 copies nothing.
    assert pool.ref_count(1) == 2


def test_copy_on_write_plus_new_blocks():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 5)  # [1, 2]
    c = kv.fork(p)
    assert kv.blocks_needed(c, 8) == 3  # the copy plus two more blocks (13 tokens -> 4 blocks)
    r = kv.append(c, 8)
    assert r.copies == [(2, 3)]
    assert r.new_blocks == 3
    assert c.block_ids == [1, 3, 4, 5]
    assert r.slots == [13, 14, 15, 16, 17, 18, 19, 20]
    assert pool.peak_used == 5


def test_copy_on_write_only_once_per_fork():
    pool = BlockPool(10, 4)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 3)  # [1]
    c1 = kv.fork(p)
    c2 = kv.fork(p)
    assert pool.ref_count(1) == 3
    assert kv.append(c1, 1).copies == [(1, 2)]   # the copy goes right after the block it copies
    assert kv.append(c2, 1).copies == [(1, 6)]   # block 2 is taken: the middle of 3..9
    # p is the last holder: no copy.
    assert pool.ref_count(1) == 1
    assert kv.append(p, 1).copies == []
    assert kv.append(c1, 1).copies == []  # c1's block 2 is full now -> new block 3, right after it
    assert c1.block_ids == [2, 3]


def test_append_into_shared_full_last_block_copies_nothing():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 8)  # [1, 2], both full
    c = kv.fork(p)
    assert kv.blocks_needed(c, 1) == 1
    r = kv.append(c, 1)
    assert r.copies == []
    assert r.new_blocks == 1
    assert c.block_ids == [1, 2, 3] and r.slots == [12]
    assert pool.ref_count(1) == 2 and pool.ref_count(2) == 2
    r = kv.append(p, 1)   # block 3, after p's block 2, is the child's: the middle of 4..7
    assert r.copies == [] and p.block_ids == [1, 2, 5] and r.slots == [20]


def test_append_of_zero_into_shared_partial_block_copies_nothing():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 2)
    c = kv.fork(p)
    assert kv.blocks_needed(c, 0) == 0
    r = kv.append(c, 0)
    assert r.copies == [] and r.new_blocks == 0 and c.block_ids == [1]
    assert pool.ref_count(1) == 2


def test_copy_on_write_that_does_not_fit_leaves_no_trace():
    pool = BlockPool(3, 4)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 5)  # [1, 2]: pool exhausted
    c = kv.fork(p)
    assert kv.append(c, 1) is None
    assert c.block_ids == [1, 2] and c.num_tokens == 5
    assert pool.ref_count(2) == 2 and pool.num_free == 0
    # Freeing the parent makes the child the only holder: it appends in place.
    assert kv.free(p) == []
    r = kv.append(c, 3)
    assert r.copies == [] and r.slots == [9, 10, 11]


def test_free_order_and_shared_blocks():
    pool = BlockPool(8, 2)
    kv = KVCacheManager(pool)
    p = BlockTable()
    kv.append(p, 4)  # [1, 2]
    c = kv.fork(p)
    kv.append(c, 3)  # [1, 2, 3, 4]
    assert kv.free(p) == []
    assert kv.free(c) == [1, 2, 3, 4]
    assert pool.free_runs() == [(1, 7)]
    assert kv.free(c) == []  # emptied table: freeing again is a no-op
    assert all(pool.ref_count(b) == 0 for b in range(8))
    assert pool.peak_used == 4


# --- stateful property test -----------------------------------------------------------


class BlockPoolMachine(RuleBasedStateMachine):
    """Random create / append / fork / free / abort against an independent shadow model.

    Shadow state:
      free: the expected FIFO free queue (block ids),
      tables: name -> expected block ids, tokens: name -> logical token values,
      store: slot -> value, a simulated KV pool that replays copies and writes, so a
        table reading back its positions proves no other table overwrote them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool: BlockPool | None = None

    @initialize(num_blocks=st.integers(2, 14), block_size=st.integers(1, 4))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.kv = KVCacheManager(self.pool)
        self.bs = block_size
        self.live: dict[int, BlockTable] = {}       # table name -> the real table
        self.group: dict[int, int] = {}             # table name -> request id
        self.shadow_free: set[int] = set(range(1, num_blocks))
        self.num_blocks = num_blocks
        self.shadow_tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}      # logical contents per table
        self.store: dict[int, int] = {}             # slot -> value (simulated pool)
        self.next_name = 0
        self.next_req = 0
        self.next_value = 0
        self.forks = 0
        self.copies = 0
        self.shadow_peak = 0

    # -- shadow helpers --------------------------------------------------------------

    def shadow_refs(self) -> Counter:
        refs: Counter = Counter()
        for ids in self.shadow_tables.values():
            refs.update(ids)
        return refs

    def shadow_runs(self) -> list[tuple[int, int]]:
        """Maximal runs of free ids, by a scan of every block."""
        runs, first = [], None
        for b in range(1, self.num_blocks + 1):
            if b < self.num_blocks and b in self.shadow_free:
                first = b if first is None else first
            elif first is not None:
                runs.append((first, b - 1))
                first = None
        return runs

    def shadow_take(self, n: int, after: int | None) -> list[int]:
        """The placement rule: the blocks right after `after` while free, then the largest run
        (the lowest of equal ones), from its start if it starts at block 1, else its middle."""
        ids = []
        b = None if after is None else after + 1
        while n and b is not None and len(ids) < n and b in self.shadow_free:
            ids.append(b)
            b += 1
        while len(ids) < n:
            self.shadow_free -= set(ids)
            first, last = max(self.shadow_runs(), key=lambda r: (r[1] - r[0], -r[0]))
            need = n - len(ids)
            if last - first + 1 <= need:
                ids += range(first, last + 1)
            else:
                start = first if first == 1 else first + (last - first + 1 - need) // 2
                ids += range(start, start + need)
        self.shadow_free -= set(ids)
        used = len(set(self.shadow_refs())) + n
        self.shadow_peak = max(self.shadow_peak, used)
        return ids

    def do_append(self, name: int, n: int) -> None:
        table = self.live[name]
        ids = self.shadow_tables[name]
        bs = self.bs
        ntok = len(self.tokens[name])
        refs = self.shadow_refs()
        cow = n > 0 and ntok % bs != 0 and refs[ids[-1]] > 1
        need = max(-(-(ntok + n) // bs) - len(ids), 0) + (1 if cow else 0)
        assert self.kv.blocks_needed(table, n) == need

        before = (list(table.block_ids), table.num_tokens, free_list(self.pool))
        r = self.kv.append(table, n)
        if need > len(self.shadow_free):
            assert r is None
            assert (list(table.block_ids), table.num_tokens, free_list(self.pool)) == before
            return
        assert r is not None
        assert r.new_blocks == need

        fresh = self.shadow_take(need, ids[-1] if ids else None)
        if cow:
            src, dst = ids[-1], fresh.pop(0)
            assert r.copies == [(src, dst)]
            ids[-1] = dst
            self.copies += 1
        else:
            assert r.copies == []
        ids.extend(fresh)
        assert table.block_ids == ids

        exp_slots = [ids[p // bs] * bs + p % bs for p in range(ntok, ntok + n)]
        assert r.slots == exp_slots

        # No slot written here lies in a block that another live table holds.
        for other, ot in self.live.items():
            if other != name:
                assert not {s // bs for s in r.slots} & set(ot.block_ids), (name, other)

        # Replay the step on the simulated pool: copies first, then the writes.
        for src, dst in r.copies:
            for off in range(bs):
                if src * bs + off in self.store:
                    self.store[dst * bs + off] = self.store[src * bs + off]
        for s in r.slots:
            self.store[s] = self.next_value
            self.tokens[name].append(self.next_value)
            self.next_value += 1

    def do_free(self, name: int) -> None:
        table = self.live.pop(name)
        ids = self.shadow_tables.pop(name)
        del self.tokens[name], self.group[name]
        refs = self.shadow_refs()  # the remaining tables only
        # decref walks the table in order; a block becomes free when no other table holds it.
        expected = [b for b in ids if refs[b] == 0]
        freed = self.kv.free(table)
        assert freed == expected
        assert table.block_ids == [] and table.num_tokens == 0
        self.shadow_free.update(expected)

    # -- rules --------------------------------------------------------------------------

    @precondition(lambda self: self.pool is not None and len(self.live) < 12)
    @rule(n=st.integers(0, 9))
    def create_request(self, n: int) -> None:
        name = self.next_name
        self.next_name += 1
        self.live[name] = BlockTable()
        self.shadow_tables[name] = []
        self.tokens[name] = []
        self.group[name] = self.next_req
        self.do_append(name, n)
        if not self.tokens[name] and n > 0:
            # Did not fit: the request is rejected and holds nothing.
            assert self.live[name].block_ids == []
            del self.live[name], self.shadow_tables[name], self.tokens[name], self.group[name]
        else:
            self.next_req += 1

    @precondition(lambda self: self.pool is not None and self.live)
    @rule(data=st.data(), n=st.integers(0, 6))
    def append(self, data, n: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.live)))
        self.do_append(name, n)

    @precondition(lambda self: self.pool is not None and self.live and len(self.live) < 12)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(sorted(self.live)))
        child = self.next_name
        self.next_name += 1
        used_before = self.pool.num_used
        self.live[child] = self.kv.fork(self.live[parent])
        self.shadow_tables[child] = list(self.shadow_tables[parent])
        self.tokens[child] = list(self.tokens[parent])
        self.group[child] = self.group[parent]
        self.forks += 1
        assert self.live[child].block_ids == self.shadow_tables[child]
        assert self.live[child].num_tokens == self.live[parent].num_tokens
        assert self.pool.num_used == used_before

    @precondition(lambda self: self.pool is not None and self.live)
    @rule(data=st.data())
    def finish_branch(self, data) -> None:
        self.do_free(data.draw(st.sampled_from(sorted(self.live))))

    @precondition(lambda self: self.pool is not None and self.live)
    @rule(data=st.data())
    def abort_request(self, data) -> None:
        req = data.draw(st.sampled_from(sorted(set(self.group.values()))))
        members = [n for n, g in self.group.items() if g == req]
        for name in data.draw(st.permutations(members)):
            self.do_free(name)
        assert req not in self.group.values()

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def pool_matches_shadow(self) -> None:
        if self.pool is None:
            return
        pool, bs = self.pool, self.bs
        refs = self.shadow_refs()
        free = free_list(pool)
        held = set(refs)

        assert free == sorted(self.shadow_free)
        assert len(free) == len(set(free)), "a block in two free runs"
        runs = pool.free_runs()
        assert all(a <= b for a, b in runs) and all(b + 1 < c for (_, b), (c, _) in pairwise(runs)), \
            "free runs overlap, touch or are empty"
        assert pool.num_free + len(held) == pool.capacity, "leak"
        assert not held & set(free), "block both free and held"
        assert NULL_BLOCK not in held and NULL_BLOCK not in free
        assert pool.ref_count(NULL_BLOCK) == 0
        for b in range(1, pool.num_blocks):
            assert pool.ref_count(b) == refs.get(b, 0), b
        assert pool.peak_used == self.shadow_peak
        assert self.copies <= self.forks

        for name, table in self.live.items():
            ids = self.shadow_tables[name]
            assert table.block_ids == ids
            assert NULL_BLOCK not in ids
            assert len(ids) == len(set(ids))
            assert table.num_tokens == len(self.tokens[name])
            assert len(ids) == -(-table.num_tokens // bs)
            # Every position reads back what this table wrote (or inherited) there.
            got = [self.store.get(ids[p // bs] * bs + p % bs) for p in range(table.num_tokens)]
            assert got == self.tokens[name], name

    def teardown(self) -> None:
        if self.pool is None:
            return
        for name in list(self.live):
            self.do_free(name)
        pool = self.pool
        assert pool.num_free == pool.capacity
        assert sorted(free_list(pool)) == list(range(1, pool.num_blocks))
        assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))


BlockPoolMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockPoolMachine = BlockPoolMachine.TestCase


def _state(pool: BlockPool, tables: list[BlockTable]):
    return (pool.free_runs(), [pool.ref_count(b) for b in range(pool.num_blocks)], pool.num_free,
            [(list(t.block_ids), list(t.ids), t.num_tokens) for t in tables])


@pytest.mark.parametrize("seed", range(100))
def test_append_in_place_each_then_appends_hand_out_blocks_as_appends_in_order_would(seed):
    """A decode batch's one pass (`append_in_place_each`, then `append` for the short tables)
    leaves the pool and the tables as appending one token to each table in order does (the same
    blocks to the same tables, so a replayed step packs what a scheduled one would)."""
    import copy
    import random

    rng = random.Random(seed)
    kv = KVCacheManager(BlockPool(rng.randint(12, 40), 4))
    tables: list[BlockTable] = []
    for _ in range(rng.randint(3, 12)):   # grown, forked (shared blocks), truncated and freed tables
        op = rng.random()
        if op < 0.5 or not tables:
            t = BlockTable()
            if kv.append(t, rng.randint(1, 14)) is not None:
                tables.append(t)
        elif op < 0.7:
            parent = rng.choice(tables)
            tables.append(kv.fork(parent, rng.randint(1, parent.num_tokens) if parent.num_tokens else 0))
        elif op < 0.85:
            t = rng.choice(tables)
            kv.truncate(t, rng.randint(0, t.num_tokens))
        else:
            kv.free(tables.pop(rng.randrange(len(tables))))
        for t in tables:   # the others decode a little meanwhile
            if rng.random() < 0.4:
                kv.append(t, rng.randint(1, 3))
    tables = [t for t in tables if t.num_tokens]
    pool = kv.pool
    # in order, one append each
    kv_seq, tables_seq = copy.deepcopy((kv, tables))
    seq_slots = [kv_seq.append(t, 1) for t in tables_seq]
    slots, short = kv.append_in_place_each(tables)
    assert all(slots[i] == -1 for i in short) and all(s >= 0 for i, s in enumerate(slots) if i not in short)
    if None in seq_slots:   # the pool runs out in order (the scheduler then preempts instead)
        return
    for i in short:
        slots[i] = kv.append(tables[i], 1).slots[0]
    assert slots == [r.slots[0] for r in seq_slots]
    assert _state(pool, tables) == _state(kv_seq.pool, tables_seq)
