"""One request can never hurt another: validation of sampling values, and per-request fault
isolation inside the engine step (a request engineered to fail fails alone)."""

from __future__ import annotations

import math

import pytest

from apar_rt import LLM, SamplingParams
from apar_rt.core import MAX_LOGIT_BIAS

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip"]


def poisoned(**fields) -> SamplingParams:
    """Sampling params with values validation would refuse: an engineered failure inside the step."""
    p = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    for k, v in fields.items():
        object.__setattr__(p, k, v)
    return p


@pytest.fixture(scope="module")
def llm(tiny_gqa):
    return LLM(str(tiny_gqa[0]), dtype="float32", device="cpu", raw=True, max_num_seqs=64)


@pytest.fixture(scope="module")
def fork_id(tiny_gqa):
    return tiny_gqa[2].convert_tokens_to_ids("[SplitMask]")


def test_poisoned_requests_fail_alone_and_the_others_finish_unchanged(llm, fork_id):
    normal = SamplingParams(max_tokens=24, logit_bias={fork_id: 4.0})  # greedy, forking
    alone = [llm.generate(p, normal)[0] for p in PROMPTS]
    bad = [poisoned(logit_bias=((5, math.nan),)),                      # a NaN logit, sampled
           poisoned(temperature=0.0, logit_bias=((5, math.nan),)),    # a NaN logit under greedy
           poisoned(logit_bias=((5, "x"),))]                            # an error that is not a NaN
    outs = llm.generate(PROMPTS[:2] + ["x y"] * len(bad) + PROMPTS[2:],
                        [normal, normal] + bad + [normal, normal])
    good = outs[:2] + outs[2 + len(bad):]
    assert [o.text for o in good] == [o.text for o in alone]
    assert [o.branches for o in good] == [o.branches for o in alone]
    assert all(o.finish_reason.value in ("stop", "length") and o.error is None for o in good)
    assert any(len(o.branches) > 1 for o in good)       # APAR branches ran beside the failures
    for o in outs[2:2 + len(bad)]:
        assert o.finish_reason.value == "error"
    nan_temp, nan_bias, other = (o.error for o in outs[2:2 + len(bad)])
    assert "not finite" in nan_temp and "temperature" in nan_temp
    assert "not finite" in nan_bias
    assert "internal error while sampling" in other and "topk" not in other   # no exception text
    s = llm.engine.scheduler
    assert s.pool.num_used == 0 and not s.running and not s.waiting


def test_degenerate_values_that_slip_past_validation_still_sample(llm):
    """The batched sampler subtracts the row's max before dividing by the temperature, so a
    temperature of 1e-300 is greedy rather than NaN; an out-of-range top_k disables itself."""
    greedy = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, mode="ar"))[0]
    for p in (poisoned(temperature=1e-300, max_tokens=8, mode="ar"), poisoned(top_k=-5, temperature=1e-30,
                                                                              max_tokens=8, mode="ar")):
        o = llm.generate(PROMPTS[1], p)[0]
        assert o.error is None and o.branches == greedy.branches


@pytest.mark.parametrize("kwargs,msg", [
    ({"temperature": math.nan}, "temperature must be a finite"),
    ({"temperature": math.inf}, "temperature must be a finite"),
    ({"temperature": 10 ** 400}, "temperature must be a finite"),
    ({"top_p": math.nan}, "top_p must be a finite"),
    ({"top_p": 1e-300 * 0}, "top_p must be in"),
    ({"max_tokens": 2 ** 31}, "max_tokens must be an integer in"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"top_k": 2 ** 31}, "top_k must be an integer in"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"seed": 2 ** 64}, "seed must be an integer in"),
    ({"stop_token_ids": [2 ** 40]}, "stop_token_ids must be an integer in"),
    ({"logit_bias": {5: math.nan}}, "logit_bias for token 5 must be a finite"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias token id must be an integer in"),
    ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, f"at most {MAX_LOGIT_BIAS}"),
    ({"logit_bias": [(5, 1.0), (5, 2.0)]}, "more than once"),
])
def test_sampling_values_are_range_checked(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_tiny_temperature_is_greedy(llm):
    """As vLLM: below 1e-5 the temperature is greedy, so the output equals temperature 0."""
    for t in (1e-40, 1e-300, 5e-324, 9e-6):
        assert SamplingParams(temperature=t).temperature == 0.0
    greedy = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12))
    tiny = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=1e-300, seed=1))
    assert [o.text for o in tiny] == [o.text for o in greedy]
    assert SamplingParams(temperature=2e-5).temperature == 2e-5


class _RaisesOnCompare:
    """A stop token id that raises when a token is compared with it: a failure inside `update`."""

    def __eq__(self, other):
        raise RuntimeError("compare")

    __hash__ = object.__hash__


@pytest.mark.parametrize("mode", ["ar", "apar"])
def test_a_request_whose_update_raises_fails_alone(llm, fork_id, mode):
    """A request whose token cannot be appended (here its stop token ids raise when compared) ends
    with an error in that step; the requests beside it finish as they do alone."""
    normal = SamplingParams(max_tokens=16, logit_bias={fork_id: 4.0}, mode=mode)
    alone = [llm.generate(p, normal)[0] for p in PROMPTS[:2]]
    bad = poisoned(temperature=0.0, mode=mode, stop_token_ids=(_RaisesOnCompare(),))
    outs = llm.generate([PROMPTS[0], "x y", PROMPTS[1]], [normal, bad, normal])
    assert [o.branches for o in (outs[0], outs[2])] == [o.branches for o in alone]
    assert outs[1].finish_reason.value == "error" and "internal error while updating" in outs[1].error
    assert "compare" not in outs[1].error
    s = llm.engine.scheduler
    assert s.pool.num_used == 0 and not s.running and not s.waiting


@pytest.mark.parametrize("max_tokens", [2, 3])
def test_a_fork_on_the_last_token_of_the_budget_ends_the_request_in_that_step(llm, fork_id, max_tokens):
    """A request that forks as it reaches max_tokens (its [Fork] and the child's forced [Child]
    fill the budget) ends in that same step, with both branches cut by length."""
    p = SamplingParams(max_tokens=max_tokens, logit_bias={fork_id: 100.0})
    outs = llm.generate(PROMPTS, p)
    for o in outs:
        assert o.finish_reason.value == "length" and o.error is None
        assert o.stats["generated_tokens"] == max_tokens
    assert any(len(o.branches) == 2 for o in outs)
    s = llm.engine.scheduler
    assert s.pool.num_used == 0 and not s.running and not s.waiting
