"""The shipped demo model: loads in transformers and apar-rt, forks on held-out prompts, and its
Medusa heads are lossless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apar_rt import LLM, SamplingParams
from apar_rt.bench.apar_vs_ar import items_in_order

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "samples/models/apar-tiny"
HELDOUT = [json.loads(line) for line in (ROOT / "samples/prompts/heldout.jsonl").read_text().splitlines()]
STRUCTURED = [r["prompt"] for r in HELDOUT if r["structured"]]


def test_size_and_transformers_loading():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size < 20e6
    model = AutoModelForCausalLM.from_pretrained(str(MODEL))
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    fork, child = tok.convert_tokens_to_ids("[SplitMask]"), tok.convert_tokens_to_ids("[SplitSop]")
    assert {fork, child} <= set(tok.all_special_ids)
    assert model.config.vocab_size == len(tok)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(MODEL), dtype="float32", device="cpu")


def test_ar_mode_equals_transformers_greedy_with_the_control_tokens_banned(llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(MODEL)).eval()
    tok = llm.tokenizer
    bad = [[tok.convert_tokens_to_ids("[SplitMask]")], [tok.convert_tokens_to_ids("[SplitSop]")]]
    outs = llm.generate(STRUCTURED[:3], [SamplingParams(max_tokens=120, mode="ar")] * 3)
    for o in outs:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([o.prompt_token_ids]), do_sample=False, max_new_tokens=120,
                              bad_words_ids=bad, pad_token_id=tok.eos_token_id)[0, len(o.prompt_token_ids):]
        assert o.branches[0]["token_ids"] == ref.tolist()


def test_heldout_structured_prompts_fork_and_keep_items_in_order(llm):
    outs = llm.generate(STRUCTURED, SamplingParams(max_tokens=400))
    assert sum(o.stats["forks"] > 0 for o in outs) >= 0.8 * len(outs)
    lists = [o for o, r in zip(outs, [r for r in HELDOUT if r["structured"]]) if r["kind"] == "list"]
    assert all(items_in_order(o.text) for o in lists)
    assert llm.engine.scheduler.pool.num_used == 0


def test_shipped_medusa_heads_are_lossless_and_accept_drafts():
    params = SamplingParams(max_tokens=300)
    base = LLM(str(MODEL), dtype="float32", device="cpu").generate(STRUCTURED[:6], params)
    spec = LLM(str(MODEL), dtype="float32", device="cpu", medusa=True).generate(STRUCTURED[:6], params)
    assert [o.text for o in spec] == [o.text for o in base]
    assert sum(o.stats["accepted_tokens_per_step"] for o in spec) / len(spec) > 1.8
    assert sum(o.stats["decode_steps"] for o in spec) < sum(o.stats["decode_steps"] for o in base)
