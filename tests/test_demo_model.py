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


@pytest.fixture(scope="module")
def demo_engine_dir(tmp_path_factory):
    from apar_rt.build.builder import BuildOptions, build

    out = tmp_path_factory.mktemp("demo_ort") / "engine"
    build(BuildOptions(model=str(MODEL), output=str(out), max_batch_size=8), progress=False, log=lambda m: None)
    return out


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_chain_runs_go_past_forks_write_their_kv_in_the_step_and_equal_plain_apar(backend, tmp_path, request,
                                                                                   monkeypatch):
    """With the demo's 4-deep chain, a thread whose accepted run holds [Fork] before its last token
    keeps the tokens after it (the child forks at once: the [Fork]'s K/V is the accepted node's),
    and the step writes the chain's K/V itself (nothing is written after it). The oracle is plain
    APAR (no drafts): the same trees, texts and finish reasons, also where max_tokens cuts the
    tree, since the thread then runs ahead of its children in reading order."""
    import apar_rt.scheduler as scheduler_module

    tree = tmp_path / "chain_4.json"
    tree.write_text(json.dumps({"name": "chain_4", "choices": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]}))
    where = str(MODEL) if backend == "torch" else str(request.getfixturevalue("demo_engine_dir"))
    base = LLM(where, backend=backend, dtype="float32", device="cpu")
    spec = LLM(where, backend=backend, dtype="float32", device="cpu", medusa=True, medusa_tree=str(tree))
    fork = spec.engine.scheduler.control.fork
    past_fork = []
    committed = []   # rows the engine wrote after the steps: none, since a chain is its own first path
    commit_kv = spec.engine.backend.commit_kv
    monkeypatch.setattr(spec.engine.backend, "commit_kv",
                        lambda idx, slots: (committed.extend(slots), commit_kv(idx, slots)))
    update_seq = scheduler_module.Scheduler._update_seq

    def watched(self, s, req, b, tokens, upd):   # records the runs kept past a [Fork], then updates
        before = len(b.token_ids)
        update_seq(self, s, req, b, tokens, upd)
        kept = b.token_ids[before:before + s.accepted]
        if s.tree and fork in kept[:-1]:
            past_fork.append(kept)

    monkeypatch.setattr(scheduler_module.Scheduler, "_update_seq", watched)
    for max_tokens in (300, 24, 41, 57, 80, 120):
        params = SamplingParams(max_tokens=max_tokens)
        want = base.generate(STRUCTURED[:8], params)
        got = spec.generate(STRUCTURED[:8], params)
        assert [o.branches for o in got] == [o.branches for o in want], max_tokens
        assert [o.text for o in got] == [o.text for o in want], max_tokens
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want], max_tokens
    assert len(past_fork) >= 10, "the chain was meant to accept runs through a [Fork]"
    assert committed == [], "the step itself writes the K/V of a chain's accepted nodes"
    assert spec.engine.scheduler.pool.num_used == 0
