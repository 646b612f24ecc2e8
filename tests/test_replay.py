"""A replayed decode step (`Scheduler._replay_decodes`, and the engine's reuse of the last step's
sampling rows) is the step `schedule` would have packed and sampled.

Two engines run the same requests in lockstep; one may replay the last step, the other always
schedules sequence by sequence (the oracle). Every step's packed inputs (block ids included) and
every output must be the same, under forks, stop strings, max_tokens cuts, seeded sampling,
requests that arrive while others decode, a max_num_seqs cap with fair shares, and a pool so
small that replayed steps run out of blocks and preemption follows.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from apar_rt import SamplingParams
from apar_rt.engine import Engine

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read", "note step tip plan idea", "sleep and water",
           "read a plan"]
FIELDS = ("input_ids", "positions", "block_tables", "context_lens", "query_start", "mask", "slot_mapping",
          "logits_indices")


def record_steps(engine: Engine) -> list:
    """Copies of every step the engine's backend executes (a replayed step reuses arrays)."""
    steps = []
    execute = engine.backend.execute

    def recording(step):
        steps.append({**{f: np.array(getattr(step, f), copy=True) for f in FIELDS},
                      "block_copies": list(step.block_copies)})
        return execute(step)

    engine.backend.execute = recording
    return steps


def count_replays(engine: Engine) -> dict:
    """Counts of replayed steps, refused replays, replays that took blocks, and replayed steps that
    sampled with the last step's rows (Engine._reused_batch)."""
    counts = {"replayed": 0, "refused": 0, "short": 0, "rows_reused": 0}
    sched = engine.scheduler
    replay = sched._replay_decodes
    reused = engine._reused_batch

    def counting_rows(out):
        got = reused(out)
        counts["rows_reused"] += got is not None
        return got

    engine._reused_batch = counting_rows

    def counting(last):
        free = sched.pool.num_free
        out = replay(last)
        counts["replayed" if out is not None else "refused"] += 1
        if out is not None and sched.pool.num_free < free:
            counts["short"] += 1     # some sequence's slot needed a block from the pool
        return out

    sched._replay_decodes = counting
    return counts


def make_engine(path, control=None, **kw) -> Engine:
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", **kw)
    if control is None:
        return engine
    return Engine(engine.backend, engine.tokenizer, engine.model_config, engine.config, control=control)


def run_lockstep(path, requests, arrivals=True, control=None, **kw):
    """Two engines, the second never replaying, stepped in lockstep on `requests` [(prompt,
    params)]: their recorded steps and outputs, how the first replayed, and the first engine."""
    engines = [make_engine(path, control, **kw) for _ in range(2)]
    replaying, oracle = engines
    oracle.scheduler._replay_decodes = lambda last: None
    counts = count_replays(replaying)
    steps = [record_steps(e) for e in engines]
    outputs: list[list] = [[], []]

    def step_both():
        for k, e in enumerate(engines):
            outputs[k].append([(o.request_id, [(d.branch_id, d.new_token_ids, d.finished) for d in o.deltas],
                                o.finished, o.text) for o in e.step()])

    for i, (prompt, params) in enumerate(requests):
        for e in engines:
            e.add_request(prompt, params, raw=True, request_id=f"r{i}")
        for _ in range(3 + i % 4 if arrivals else 0):     # requests arrive while others decode
            step_both()
    while any(e.has_unfinished() for e in engines):
        step_both()
    assert len(steps[0]) == len(steps[1])
    for n, (a, b) in enumerate(zip(*steps)):
        for f in FIELDS:
            assert np.array_equal(a[f], b[f]), (n, f)
        assert a["block_copies"] == b["block_copies"], n
    assert outputs[0] == outputs[1]
    return steps[0], outputs[0], counts, replaying


@pytest.mark.parametrize("load", ["roomy", "tight"])
def test_replayed_steps_equal_scheduled_ones(tiny_gqa, load):
    """A mixed load: APAR requests that fork, AR ones, stop strings, max_tokens cuts, arrivals;
    with a roomy pool, and with one small enough that normal steps preempt."""
    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    kw = ({"num_blocks": 400, "max_num_seqs": 6, "max_num_tokens": 64} if load == "roomy" else
          {"num_blocks": 22, "max_num_seqs": 5, "max_num_tokens": 16})
    params = [SamplingParams(max_tokens=40, logit_bias={fork: 3.0}),
              SamplingParams(max_tokens=12, mode="ar"),
              SamplingParams(max_tokens=30, stop=("ee", "a p"), logit_bias={fork: 2.0}),
              SamplingParams(max_tokens=25, ignore_eos=True, mode="ar"),
              SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=5, logit_bias={fork: 2.0}),
              SamplingParams(max_tokens=25, temperature=0.7, top_k=20, seed=11, mode="ar")]
    steps, outputs, counts, engine = run_lockstep(
        path, [(p, params[i % len(params)]) for i, p in enumerate(PROMPTS)], block_size=4, **kw)
    assert counts["replayed"] >= len(steps) // 10 and counts["short"] > 0, counts
    assert counts["rows_reused"] > 0, counts
    assert any(d[0] > 0 for step in outputs for o in step for d in o[1]), "the bias was meant to fork"
    if load == "tight":
        assert engine.scheduler.num_preemptions > 0


def test_a_replayed_step_short_of_blocks_is_scheduled_and_preempts(tiny_gqa):
    """Three AR decodes of one length cross a block boundary in the same step; the pool cannot give
    all three a block then, so the replay is refused and `schedule` preempts, as without replay."""
    path, _, _ = tiny_gqa
    params = SamplingParams(max_tokens=40, ignore_eos=True, mode="ar")
    _, _, counts, engine = run_lockstep(path, [("one two three", params)] * 3, arrivals=False,
                                        block_size=4, num_blocks=24, max_num_seqs=3, max_num_tokens=64)
    assert counts["refused"] > 0 and counts["replayed"] > 0 and counts["short"] > 0, counts
    assert engine.scheduler.num_preemptions > 0


def test_a_step_that_feeds_fork_samples_with_its_own_bans(tiny_gqa):
    """A model whose [Fork] has no [Child] to follow it never forks, so a sampled [Fork] changes
    nothing the scheduler sees: the next step is replayed, but it feeds [Fork], after which
    [Fork] is banned. The engine must not sample it with the last step's rows (which allowed it)."""
    from apar_rt.apar import ControlTokens

    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    params = SamplingParams(max_tokens=30, ignore_eos=True, logit_bias={fork: 6.0})
    _, outputs, counts, _ = run_lockstep(path, [("one two three", params)],
                                         arrivals=False, control=ControlTokens(fork=fork, child=None),
                                         block_size=4, num_blocks=64, max_num_seqs=4, max_num_tokens=64)
    tokens: dict[str, list[int]] = {}
    for step in outputs:
        for rid, deltas, _, _ in step:
            tokens.setdefault(rid, []).extend(t for d in deltas for t in d[1])
    assert sum(t.count(fork) for t in tokens.values()) >= 2, tokens
    assert counts["replayed"] > 0, counts
    assert not any(a == b == fork for t in tokens.values() for a, b in pairwise(t)), "[Fork] twice in a row"


def test_the_step_after_a_fork_whose_child_waits_is_replayed(tiny_gqa, monkeypatch):
    """A fork's child waits for its parent to compute [Fork]'s K/V, so the step after the fork
    holds the same sequences (the parent feeding [Fork]) and may be replayed; the child joins the
    step after that. The replayed steps and outputs are those `schedule` packs (the oracle)."""
    from apar_rt.scheduler import Scheduler

    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    feeding_fork = []   # sequences of each replayed step that feeds [Fork]
    replay = Scheduler._replay_decodes

    def watched(self, last):   # the oracle's own attribute (never replay) still wins over this
        out = replay(self, last)
        if out is not None and fork in out.step.input_ids.tolist():
            feeding_fork.append(len(out.seqs))
        return out

    monkeypatch.setattr(Scheduler, "_replay_decodes", watched)
    params = SamplingParams(max_tokens=60, logit_bias={fork: 3.0})
    _, _, counts, engine = run_lockstep(path, [(p, params) for p in PROMPTS[:3]], arrivals=False,
                                        block_size=4, num_blocks=200, max_num_seqs=16)
    assert engine.scheduler.num_forks >= 3
    assert feeding_fork, counts
