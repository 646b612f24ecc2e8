"""Greedy output is a function of the request alone, including outputs cut by max_tokens.

Each test runs the same requests under two loads that schedule branches differently (pool size
and preemption, max_num_seqs, concurrent arrivals) with a max_tokens small enough to cut the
trees, and compares tokens, tree and text. Under the old shared budget (whichever branch was
scheduled got the last tokens) these differed; under the reading-order budget they must not.
Medusa on/off and torch vs onnxruntime live beside their fixtures (test_medusa.py,
test_onnxruntime_backend.py).
"""

from __future__ import annotations

import pytest

from apar_rt import LLM, SamplingParams
from apar_rt.apar import reading_order_counts
from apar_rt.core import Branch

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read", "note step tip plan idea"]


def fork_id(tok):
    return tok.convert_tokens_to_ids("[SplitMask]")


def same(a, b):
    assert [o.branches for o in a] == [o.branches for o in b]
    assert [o.text for o in a] == [o.text for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]
    assert [o.stats["generated_tokens"] for o in a] == [o.stats["generated_tokens"] for o in b]


def test_tiny_pool_with_preemption_matches_a_roomy_one(tiny_gqa):
    path, _, tok = tiny_gqa
    params = SamplingParams(max_tokens=18, logit_bias={fork_id(tok): 4.0})
    tight = LLM(str(path), raw=True, num_blocks=14, block_size=4, max_num_tokens=12, max_num_seqs=3)
    roomy = LLM(str(path), raw=True, num_blocks=1024, block_size=4, max_num_tokens=4096, max_num_seqs=256)
    got, want = tight.generate(PROMPTS, params), roomy.generate(PROMPTS, params)
    assert tight.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert sum(o.stats["forks"] for o in want) >= 3, "the bias was meant to make forks happen"
    assert any(o.finish_reason.value == "length" for o in want), "max_tokens was meant to cut outputs"
    same(got, want)
    assert all(sum(len(b["token_ids"]) for b in o.branches) == o.stats["generated_tokens"] <= 18 for o in got)


def test_a_preempted_tree_wider_than_the_pool_resumes_and_finishes_as_alone(tiny_gqa):
    """A wide tree in a tiny pool finishes alone (it sheds branches as it grows). Preempted beside
    another request, its live branches together need more blocks than the pool has: it must
    resume (once the pool is free) and give the same output, not fail as too big."""
    path, _, tok = tiny_gqa
    llm = LLM(str(path), raw=True, block_size=8, num_blocks=12)
    wide = SamplingParams(max_tokens=80, ignore_eos=True, logit_bias={fork_id(tok): 5.0})
    other = SamplingParams(max_tokens=80, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], wide)
    assert alone[0].error is None and len(alone[0].branches) > 1
    sched = llm.engine.scheduler
    needs = []   # blocks each waiting request needed for all its live branches, as admission asked
    count = sched._blocks_to_resume
    sched._blocks_to_resume = lambda req: needs.append(count(req)) or needs[-1]
    outs = llm.generate([PROMPTS[1], PROMPTS[0]], [other, wide])
    assert max(needs) > sched.pool.capacity, "the tree was meant to be preempted wider than the pool"
    same(outs[1:], alone)
    assert outs[0].error is None and outs[0].finish_reason.value == "length"
    assert sched.pool.num_used == 0


def test_seeded_sampling_is_a_function_of_the_request_too(tiny_gqa):
    """A sampled request with a seed: each branch draws from its own RNG, seeded by the request's
    seed and the branch's place in the tree, so a tiny pool that preempts, a max_num_seqs that
    makes branches take turns, and one request at a time give the same trees and texts as a
    roomy engine running all at once. (With one RNG a request, the branches' draws interleaved as
    the steps were packed.) Negative seeds are int64 seeds as OpenAI clients send them."""
    path, _, tok = tiny_gqa
    fork = fork_id(tok)
    params = [SamplingParams(max_tokens=40, temperature=t, top_k=k, top_p=p, seed=seed, logit_bias={fork: 3.0})
              for t, k, p, seed in ((0.8, 0, 1.0, 1), (1.0, 20, 0.9, 2), (0.7, 0, 0.8, -3), (1.2, 5, 1.0, 4),
                                    (0.9, 0, 1.0, 5), (1.0, 0, 0.95, 2 ** 63 - 1))]
    roomy = LLM(str(path), raw=True, num_blocks=1024, block_size=4, max_num_seqs=256)
    want = roomy.generate(PROMPTS, params)
    assert sum(o.stats["forks"] for o in want) >= 6, "the bias was meant to make forks happen"
    tight = LLM(str(path), raw=True, num_blocks=24, block_size=4, max_num_tokens=12, max_num_seqs=3)
    same(tight.generate(PROMPTS, params), want)
    assert tight.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    same([roomy.generate([p], q)[0] for p, q in zip(PROMPTS, params)], want)
    again = roomy.generate(PROMPTS, params)
    same(again, want)
    other = roomy.generate(PROMPTS, [SamplingParams(**{**_fields(q), "seed": q.seed + 1}) for q in params])
    assert [o.text for o in other] != [o.text for o in want], "the seed was meant to matter"


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in ("max_tokens", "temperature", "top_k", "top_p", "seed", "logit_bias")}


def test_one_request_at_a_time_matches_sixteen_at_once(tiny_gqa):
    """The engine loop as the servers drive it: 16 concurrent streams vs one after another."""
    from apar_rt.engine import Engine
    from apar_rt.serve.engine_loop import EngineLoop

    path, _, tok = tiny_gqa
    params = SamplingParams(max_tokens=16, logit_bias={fork_id(tok): 4.0})
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_num_seqs=8, max_num_tokens=64,
                                    num_blocks=96, block_size=4)
    prompts = (PROMPTS * 3)[:16]

    def final(stream):
        for ev in stream:
            if ev.finished:
                return ev.output

    with EngineLoop(engine) as loop:
        alone = [final(loop.add(p, params, raw=True, timeout=30)) for p in prompts]
        streams = [loop.add(p, params, raw=True, timeout=30) for p in prompts]
        together = [final(s) for s in streams]
    assert any(o.finish_reason.value == "length" for o in alone)
    assert sum(o.stats["forks"] for o in alone) >= 3
    same(together, alone)


def test_sixteen_asyncio_streams_get_every_event_in_order(tiny_gqa):
    """Streams consumed in an asyncio loop (as the OpenAI server does), which gets each step's events
    in one batch: every stream's text, concatenated from its events, is its final text, it ends with
    exactly one finished event, and the outputs match the same requests one at a time."""
    import asyncio

    from apar_rt.engine import Engine
    from apar_rt.serve.engine_loop import EngineLoop

    path, _, tok = tiny_gqa
    params = SamplingParams(max_tokens=16, logit_bias={fork_id(tok): 4.0})
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_num_seqs=8, max_num_tokens=64,
                                    num_blocks=96, block_size=4)
    prompts = (PROMPTS * 3)[:16]

    async def run(loop):
        streams = await asyncio.gather(*[loop.add_async(p, params, raw=True) for p in prompts])

        async def read(stream):
            return [ev async for ev in stream]

        return await asyncio.wait_for(asyncio.gather(*[read(s) for s in streams]), 60)   # a lost event: fail, not hang

    with EngineLoop(engine) as loop:
        alone = [next(ev.output for ev in loop.add(p, params, raw=True, timeout=30) if ev.finished)
                 for p in prompts]
        together = asyncio.run(run(loop))
    for events, want in zip(together, alone):
        assert [ev.finished for ev in events] == [False] * (len(events) - 1) + [True]
        assert "".join(ev.text for ev in events) == events[-1].output.text == want.text
    same([events[-1].output for events in together], alone)
    assert sum(o.stats["forks"] for o in alone) >= 3


def _branch(i, parent, fork_index, n):
    return Branch(id=i, parent=parent, fork_index=fork_index, depth=0 if parent is None else 1, prefix=[],
                  token_ids=list(range(n)))


def test_reading_order_counts_by_hand():
    # root: 6 tokens with children at its tokens 1 and 4; child 1 has a grandchild at its token 0.
    # Reading order: r0 r1 | c1: a0 | g: 3 tokens | a1 a2 | r2 r3 r4 | c2: 2 tokens | r5
    br = [_branch(0, None, None, 6), _branch(2, 0, 4, 2), _branch(1, 0, 1, 3), _branch(3, 1, 0, 3)]
    br = sorted(br, key=lambda b: b.id)
    full = {0: 6, 1: 3, 2: 2, 3: 3}
    assert reading_order_counts(br, None) == full
    assert reading_order_counts(br, 14) == full
    assert reading_order_counts(br, 2) == {0: 2, 1: 0, 2: 0, 3: 0}
    assert reading_order_counts(br, 3) == {0: 2, 1: 1, 2: 0, 3: 0}
    assert reading_order_counts(br, 6) == {0: 2, 1: 1, 2: 0, 3: 3}
    assert reading_order_counts(br, 11) == {0: 5, 1: 3, 2: 0, 3: 3}
    assert reading_order_counts(br, 12) == {0: 5, 1: 3, 2: 1, 3: 3}


# ---- fairness and the bounded queue ----------------------------------------------------------

def test_a_second_request_is_scheduled_while_a_wide_tree_runs(tiny_gqa):
    """max_num_seqs 4 and a tree with at least 4 live branches: the newcomer still gets seats (a
    fair share), instead of waiting for the tree to shrink."""
    from apar_rt.engine import Engine

    path, _, tok = tiny_gqa
    eng = Engine.from_pretrained(path, dtype="float32", device="cpu", max_num_seqs=4, num_blocks=256,
                                 block_size=4)
    wide = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=200, logit_bias={fork_id(tok): 6.0}), raw=True)
    tree = eng._requests[wide]
    for _ in range(60):
        eng.step()
        if tree.num_live >= 4:
            break
    assert tree.num_live >= 4, "the bias was meant to grow a wide tree"
    other = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=8), raw=True)
    req = eng._requests[other]
    eng.step()
    assert req.branches[0].table.num_tokens > 0            # admitted and prefilled
    assert not tree.finished and tree.num_live >= 2
    eng.step()
    assert req.branches[0].token_ids                       # and decoding beside the tree
    while eng.has_unfinished():
        eng.step()


def test_seats_a_share_leaves_free_go_round_again(tiny_gqa):
    """max_num_seqs 6, a tree with at least 5 branches ready and a newcomer: each first gets a share
    of 3 seats; the seats the newcomer leaves (it has one branch) go to the tree in a second round."""
    from apar_rt.engine import Engine

    path, _, tok = tiny_gqa
    eng = Engine.from_pretrained(path, dtype="float32", device="cpu", max_num_seqs=6, num_blocks=256,
                                 block_size=4)
    wide = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=200, logit_bias={fork_id(tok): 6.0}), raw=True)
    tree = eng._requests[wide]
    sched = eng.scheduler
    for _ in range(80):
        eng.step()
        if len(sched._schedulable(tree)) >= 5:
            break
    ready = len(sched._schedulable(tree))
    assert ready >= 5, "the bias was meant to grow a wide tree"
    other = eng._requests[eng.add_request(PROMPTS[0], SamplingParams(max_tokens=8), raw=True)]
    steps = []
    schedule = sched.schedule
    sched.schedule = lambda: steps.append(schedule()) or steps[-1]
    eng.step()
    seats = [s.request for s in steps[0].seqs]
    assert seats.count(other) == 1
    assert seats.count(tree) == min(ready, 5)     # 3 as its share, then the 2 the newcomer left


def test_a_full_waiting_queue_refuses_newcomers_and_loses_nothing_admitted(tiny_gqa):
    from apar_rt.engine import Engine
    from apar_rt.scheduler import EngineOverloaded

    path = tiny_gqa[0]
    params = SamplingParams(max_tokens=6)
    eng = Engine.from_pretrained(path, dtype="float32", device="cpu", max_num_seqs=2, max_waiting=3)
    ids = [eng.add_request(p, params, raw=True) for p in PROMPTS[:3]]
    with pytest.raises(EngineOverloaded, match="--max-waiting 3"):
        eng.add_request(PROMPTS[3], params, raw=True)
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    ref = LLM(str(path), raw=True).generate(PROMPTS[:3], params)
    assert [done[i].branches for i in ids] == [o.branches for o in ref]
    assert all(done[i].error is None for i in ids)
    # offline runs keep the queue within the bound by stepping, and lose nothing
    outs = eng.run([(p, params, {"raw": True}) for p in PROMPTS])
    assert all(o.error is None for o in outs) and len(outs) == len(PROMPTS)


def test_the_server_answers_429_past_max_waiting_and_finishes_the_admitted(tiny_gqa):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    import concurrent.futures

    from apar_rt.engine import Engine
    from apar_rt.serve.openai_server import OpenAIServer

    path = tiny_gqa[0]
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_num_seqs=1, max_waiting=1)
    srv = OpenAIServer(engine, ["tiny"], port=0).start()
    try:
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=120) for _ in range(8)]
            rs = [f.result() for f in futs]
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and 200 in codes, codes
        for r in rs:
            if r.status_code == 429:
                err = r.json()["error"]
                assert "--max-waiting 1" in err["message"] and err["code"] == "max_waiting"
            else:
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        texts = {r.json()["choices"][0]["text"] for r in rs if r.status_code == 200}
        assert len(texts) == 1                      # every admitted request finished, identically
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200                 # and the server keeps serving
    finally:
        srv.stop()
