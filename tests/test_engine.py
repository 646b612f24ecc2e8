"""Engine behaviour: chunked prefill, budgets, abort, sampling controls, streaming deltas."""

from __future__ import annotations

import numpy as np
import pytest

from apar_rt.apar import branch_schema
from apar_rt import LLM, SamplingParams
from apar_rt.backends.torch_backend import TorchBackend

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read"]


class SpyBackend(TorchBackend):
    """The real torch backend, recording each step's shape."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.steps = []
        self.longest = []     # each step's most new tokens of one sequence

    def execute(self, step):
        self.steps.append((step.num_tokens, step.block_tables.shape[0]))
        self.longest.append(int(np.diff(step.query_start).max()))
        super().execute(step)


def make_llm(path, **kw):
    from apar_rt.config import EngineConfig, ModelConfig
    from apar_rt.engine import Engine
    from apar_rt.model.tokenizer import load_tokenizer

    llm = LLM.__new__(LLM)
    llm.raw = True
    backend = SpyBackend(str(path), dtype="float32", device="cpu")
    llm.engine = Engine(backend, load_tokenizer(path), ModelConfig.from_dir(path), EngineConfig(**kw))
    return llm, backend


def greedy_tokens(outs):
    return [o.branches[0]["token_ids"] for o in outs]


def test_budgets_are_respected_and_chunking_changes_nothing(tiny_gqa):
    path, _, _ = tiny_gqa
    ref, _ = make_llm(path, mode="ar")
    want = greedy_tokens(ref.generate(PROMPTS, SamplingParams(max_tokens=12)))
    llm, spy = make_llm(path, mode="ar", max_num_tokens=3, max_num_seqs=2)
    got = greedy_tokens(llm.generate(PROMPTS, SamplingParams(max_tokens=12)))
    assert got == want
    assert all(t <= 3 and b <= 2 for t, b in spy.steps)
    assert any(t == 3 and b == 1 for t, b in spy.steps)   # a prefill chunk alone


@pytest.mark.parametrize("mode", ["ar", "apar"])
def test_no_branch_outlives_the_budget(tiny_gqa, mode):
    """After every step, each live branch's next token would still land inside the request's
    budget in reading order (a branch whose next position reaches it ends that step), and an AR
    request cut by max_tokens has generated exactly that many tokens."""
    path, _, tok = tiny_gqa
    bias = {tok.convert_tokens_to_ids("[SplitMask]"): 4.0} if mode == "apar" else {}
    llm, _ = make_llm(path, mode=mode)
    eng = llm.engine
    for max_tokens in (5, 11, 24):
        params = SamplingParams(max_tokens=max_tokens, logit_bias=bias, ignore_eos=True)
        reqs = [eng._requests[eng.add_request(p, params)] for p in PROMPTS]
        forked = False
        while eng.has_unfinished():
            eng.step()
            for req in reqs:
                forked |= len(req.branches) > 1
                for b in req.live_branches():
                    assert req.next_position(b) < req.budget, (max_tokens, b.id)
        if mode == "ar":
            assert [r.num_generated for r in reqs] == [max_tokens] * len(reqs)
        else:
            assert forked, "the bias was meant to make forks happen"


@pytest.mark.parametrize("mode,threshold", [("ar", 3), ("apar", 1)])
def test_long_prompts_prefill_in_chunks_of_the_threshold(tiny_gqa, mode, threshold):
    """long_prefill_token_threshold (vLLM's rule): no sequence gets more new tokens than that in a
    step, several prompts' chunks still share a step, and every branch's tokens are those of a run
    with each prompt in one chunk. At 1, an APAR child's [Fork] [Child] go in two steps too."""
    path, _, tok = tiny_gqa
    bias = {tok.convert_tokens_to_ids("[SplitMask]"): 4.0} if mode == "apar" else {}
    params = SamplingParams(max_tokens=24, logit_bias=bias)
    ref, ref_spy = make_llm(path, mode=mode, long_prefill_token_threshold=0)
    want = [o.branches for o in ref.generate(PROMPTS, params)]
    assert max(ref_spy.longest) > 3, "without the threshold a prompt goes in one chunk"
    llm, spy = make_llm(path, mode=mode, long_prefill_token_threshold=threshold)
    got = [o.branches for o in llm.generate(PROMPTS, params)]
    assert got == want
    assert max(spy.longest) == threshold
    assert any(b >= 2 and t >= 2 * threshold for t, b in spy.steps), "chunks of several prompts in one step"
    if mode == "apar":
        assert sum(len(o) > 1 for o in got) >= 3, "the bias was meant to make forks happen"


def test_prefill_and_decode_share_a_step(tiny_gqa):
    path, _, _ = tiny_gqa
    llm, spy = make_llm(path, mode="ar", max_num_tokens=64)
    eng = llm.engine
    eng.add_request("one two three", SamplingParams(max_tokens=8), raw=True)
    eng.step()
    eng.add_request("tree fork model data run build", SamplingParams(max_tokens=8), raw=True)
    eng.step()
    assert spy.steps[1][1] == 2 and spy.steps[1][0] > 2   # one decode token + a whole prefill


def test_abort_frees_blocks_and_others_are_unchanged(tiny_gqa):
    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    params = SamplingParams(max_tokens=30, logit_bias={fork: 4.0})
    ref, _ = make_llm(path)
    want = ref.generate([PROMPTS[0], PROMPTS[2]], params)
    llm, _ = make_llm(path)
    eng = llm.engine
    a = eng.add_request(PROMPTS[0], params, raw=True)
    b = eng.add_request(PROMPTS[1], params, raw=True)
    c = eng.add_request(PROMPTS[2], params, raw=True)
    done = {}
    for _ in range(4):
        for o in eng.step():
            done[o.request_id] = o
    assert eng.scheduler.pool.num_used > 0
    held_by_b = eng._requests[b].held_blocks()
    assert held_by_b and eng.abort_request(b)
    assert not eng.abort_request(b)           # twice is a no-op
    assert not eng.abort_request("no-such-id")
    while eng.has_unfinished():
        for o in eng.step():
            done[o.request_id] = o
    assert eng.scheduler.pool.num_used == 0
    assert done[a].branches == want[0].branches and done[c].branches == want[1].branches


def test_streaming_deltas_rebuild_the_branches(tiny_gqa):
    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    llm, _ = make_llm(path)
    eng = llm.engine
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=30, logit_bias={fork: 4.0}), raw=True)
    req = eng._requests[rid]
    streamed: dict[int, list[int]] = {}
    final = None
    while eng.has_unfinished():
        for o in eng.step():
            for d in o.deltas:
                streamed.setdefault(d.branch_id, []).extend(d.new_token_ids)
            if o.finished:
                final = o
    assert final.request_id == rid and final.stats["forks"] >= 1
    # Deltas carry the live branch ids; the final list is those branches cut to the budget.
    assert {b.id: b.token_ids for b in req.branches} == streamed
    assert final.branches == branch_schema(req.branches, 30)
    assert sum(len(b["token_ids"]) for b in final.branches) == final.stats["generated_tokens"] <= 30


def test_stop_string_and_stop_token(tiny_gqa):
    path, _, tok = tiny_gqa
    llm, _ = make_llm(path, mode="ar")
    base = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20))[0]
    text, ids = base.text, base.branches[0]["token_ids"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    o = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, stop=[stop]))[0]
    assert o.text == text[:text.index(stop)] and o.finish_reason.value == "stop"
    o = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=20, stop_token_ids=[ids[4]]))[0]
    assert o.branches[0]["token_ids"] == ids[:ids.index(ids[4]) + 1]


def test_logit_bias_forces_a_token(tiny_gqa):
    path, _, _ = tiny_gqa
    llm, _ = make_llm(path, mode="ar")
    o = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, logit_bias={77: 100.0}))[0]
    assert o.branches[0]["token_ids"] == [77, 77, 77]


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_gqa):
    path, _, _ = tiny_gqa
    llm, _ = make_llm(path, mode="ar")
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate([PROMPTS[0]], p)[0].branches
    mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]],
                         [p, SamplingParams(max_tokens=16, temperature=1.0), p])
    assert mixed[0].branches == alone
    other = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0].branches
    assert other != alone


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_gqa):
    path, _, _ = tiny_gqa
    llm, _ = make_llm(path, mode="ar")
    greedy = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=10))[0].branches
    assert llm.generate([PROMPTS[3]], SamplingParams(max_tokens=10, temperature=0.8, top_k=1, seed=1))[0].branches \
        == greedy
    assert llm.generate([PROMPTS[3]], SamplingParams(max_tokens=10, temperature=0.8, top_p=1e-6, seed=1))[0].branches \
        == greedy


def test_sampler_top_p_keeps_the_smallest_nucleus():
    from apar_rt.sampler import SamplingBatch, make_generator, sample
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 300, np.float32))
    for params, want in ((SamplingParams(temperature=1.0, top_p=0.75), {0, 1}),
                         (SamplingParams(temperature=1.0, top_k=3), {0, 1, 2})):
        batch, g = SamplingBatch(), make_generator(0)
        for _ in range(300):
            batch.add(params, (), g)
        tokens, ok, _, _ = sample(logits, batch)
        assert ok.all() and set(tokens.tolist()) == want


def test_ar_mode_never_emits_control_tokens(tiny_gqa):
    path, _, tok = tiny_gqa
    fork, child = tok.convert_tokens_to_ids("[SplitMask]"), tok.convert_tokens_to_ids("[SplitSop]")
    llm, _ = make_llm(path, mode="ar")
    o = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=20, logit_bias={fork: 100.0, child: 100.0}))[0]
    assert fork not in o.branches[0]["token_ids"] and child not in o.branches[0]["token_ids"]
    assert o.stats["forks"] == 0


def test_model_without_control_tokens_never_forks(tiny_mha):
    path, _, _ = tiny_mha
    llm, _ = make_llm(path, mode="apar")
    o = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=10))
    assert all(x.stats["forks"] == 0 and len(x.branches) == 1 for x in o)


def test_per_request_mode(tiny_gqa):
    """One APAR engine serves an AR request exactly as an AR engine does, beside forking requests."""
    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    bias = {fork: 4.0}
    ar_engine, _ = make_llm(path, mode="ar")
    want = ar_engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, logit_bias=bias))[0]
    llm, _ = make_llm(path, mode="apar")
    got = llm.generate([PROMPTS[0], PROMPTS[0]], [SamplingParams(max_tokens=20, logit_bias=bias, mode="ar"),
                                                  SamplingParams(max_tokens=20, logit_bias=bias)])
    assert got[0].branches == want.branches and got[0].stats["forks"] == 0
    assert got[1].stats["forks"] > 0
    with pytest.raises(ValueError, match="mode"):
        SamplingParams(mode="fast")


def test_ban_fork_when_full(tiny_gqa):
    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    params = SamplingParams(max_tokens=20, logit_bias={fork: 4.0})
    free, _ = make_llm(path, max_num_seqs=1)
    assert free.generate([PROMPTS[0]], params)[0].stats["forks"] > 0
    full, _ = make_llm(path, max_num_seqs=1, ban_fork_when_full=True)
    o = full.generate([PROMPTS[0]], params)[0]
    assert o.stats["forks"] == 0 and fork not in o.branches[0]["token_ids"]


def test_loading_freezes_the_heap_but_a_dropped_engine_is_reclaimed(tiny_gqa):
    """from_pretrained moves what is loaded out of the step loop's garbage collections, and does
    so before making the engine, whose own reference cycles must stay collectable; it raises the
    young generation's threshold, never lowers it."""
    import gc
    import weakref

    from apar_rt.engine import Engine

    from apar_rt.engine import YOUNG_GC_THRESHOLD

    path, _, _ = tiny_gqa
    gc.unfreeze()
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        engine = Engine.from_pretrained(str(path), num_blocks=16, block_size=4)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, 10, 10)   # young collections, not every 700
        scheduler = weakref.ref(engine.scheduler)   # holds the engine's bound methods: a cycle
        engine = None
        gc.collect()
        assert scheduler() is None, "the engine was frozen: a dropped engine is never reclaimed"
        gc.set_threshold(50_000, 10, 10)            # a higher threshold of the user's is kept
        Engine.from_pretrained(str(path), num_blocks=16, block_size=4)
        assert gc.get_threshold() == (50_000, 10, 10)
    finally:
        gc.set_threshold(*saved)
