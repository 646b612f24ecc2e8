"""Engine tokens against transformers: AR greedy vs generate(), APAR branches vs per-branch argmax."""

from __future__ import annotations

import numpy as np
import pytest

from apar_rt import LLM, SamplingParams
from apar_rt.testing.oracles import assert_branches_follow_argmax, hf_greedy

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read"]


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_ar_greedy_matches_transformers_under_preemption(request, fixture):
    path, hf, tok = request.getfixturevalue(fixture)
    # 5 prompts of ~2-10 tokens + 24 new tokens each, 4-token blocks: needs ~40 blocks, has 14.
    llm = LLM(str(path), mode="ar", raw=True, num_blocks=15, block_size=4, max_num_tokens=16)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24))
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for o in outs:
        assert o.error is None
        assert len(o.branches) == 1
        assert o.branches[0]["token_ids"] == hf_greedy(hf, o.prompt_token_ids, 24, tok.eos_token_id)
        text = tok.decode(o.branches[0]["token_ids"], skip_special_tokens=True)
        assert o.text == text
    assert llm.engine.scheduler.pool.num_used == 0


@pytest.mark.parametrize("max_depth", [1, 2])
def test_apar_branches_match_per_branch_argmax(tiny_gqa, max_depth):
    """Forked requests under a pool small enough to preempt them; blocks all return."""
    path, hf, tok = tiny_gqa
    fork, child = tok.convert_tokens_to_ids("[SplitMask]"), tok.convert_tokens_to_ids("[SplitSop]")
    bias = 4.0
    llm = LLM(str(path), mode="apar", raw=True, num_blocks=24, block_size=4, max_num_tokens=24,
              max_depth=max_depth)
    outs = llm.generate(PROMPTS[:4], SamplingParams(max_tokens=40, logit_bias={fork: bias}))
    for o in outs:
        assert_branches_follow_argmax(hf, o, fork, child, bias, max_depth)
        assert o.stats["generated_tokens"] == sum(len(b["token_ids"]) for b in o.branches) <= 40
    assert sum(o.stats["forks"] for o in outs) >= 4, "the bias was meant to make forks happen"
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to preempt forked requests"
    assert llm.engine.scheduler.pool.num_used == 0


def test_a_tree_larger_than_the_pool_finishes_by_recomputing_branches(tiny_gqa):
    """Alone, a request whose branches together outgrow the pool frees its newest branch's blocks
    (recomputed later) instead of failing, as long as each branch fits."""
    path, hf, tok = tiny_gqa
    fork, child = tok.convert_tokens_to_ids("[SplitMask]"), tok.convert_tokens_to_ids("[SplitSop]")
    llm = LLM(str(path), mode="apar", raw=True, num_blocks=11, block_size=4)
    # 10 usable blocks hold 40 tokens: any one branch (at most prompt + max_tokens = 39) fits, the tree does not.
    o = llm.generate(["first tip"], SamplingParams(max_tokens=36, logit_bias={fork: 4.0}))[0]
    assert o.stats["peak_kv_blocks"] <= 10 and o.stats["preemptions"] > 0 and o.stats["forks"] >= 2
    assert_branches_follow_argmax(hf, o, fork, child, 4.0, 2)
    assert o.stats["generated_tokens"] == 36
    assert llm.engine.scheduler.pool.num_used == 0


def test_apar_fork_positions_are_recovered_in_reading_order(tiny_gqa):
    path, hf, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    llm = LLM(str(path), mode="apar", raw=True)
    o = llm.generate(["one two three"], SamplingParams(max_tokens=30, logit_bias={fork: 4.0}))[0]
    assert o.stats["forks"] >= 1
    # Rebuild the reading order independently from the schema: depth-first, child at its [Fork].
    br = {b["id"]: b for b in o.branches}

    def walk(bid):
        out = []
        for i, t in enumerate(br[bid]["token_ids"]):
            out.append(t)
            for c in o.branches:
                if c["parent"] == bid and c["fork_index"] == i:
                    out += walk(c["id"])
        return out

    ids = walk(0)
    special = set(tok.all_special_ids)
    assert o.text == tok.decode([t for t in ids if t not in special], skip_special_tokens=True)


@pytest.mark.parametrize("max_tokens", [9, 14, 22, 40])
def test_a_forks_child_shares_its_parents_fork_token_and_starts_with_a_decode(tiny_gqa, max_tokens):
    """The parent computes [Fork]; its child waits one step, shares those blocks and feeds [Child]
    alone: no step has a sequence of two new tokens (prompts are prefilled whole), the branches
    still follow the per-branch argmax, budget cuts included (a parent may end right at its
    [Fork]: its child then shares what it has), and every block returns."""
    path, hf, tok = tiny_gqa
    fork, child = tok.convert_tokens_to_ids("[SplitMask]"), tok.convert_tokens_to_ids("[SplitSop]")
    llm = LLM(str(path), mode="apar", raw=True, block_size=4)
    backend = llm.engine.backend
    run, q_lens = backend.execute, []

    def spy(step):
        q_lens.extend(np.diff(step.query_start).tolist())
        return run(step)

    backend.execute = spy
    outs = llm.generate(PROMPTS[:4], SamplingParams(max_tokens=max_tokens, logit_bias={fork: 4.0}))
    assert sum(o.stats["forks"] for o in outs) >= 2, "the bias was meant to make forks happen"
    assert 2 not in q_lens and min(len(o.prompt_token_ids) for o in outs) > 2
    for o in outs:
        assert_branches_follow_argmax(hf, o, fork, child, 4.0, llm.engine.config.max_depth)
    assert llm.engine.scheduler.pool.num_used == 0
