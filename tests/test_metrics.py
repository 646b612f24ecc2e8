"""The metrics vocabulary: Medusa's metrics only when Medusa is on, its step counters counting only
draft-tree steps; KV usage and live branches from the loop's snapshot."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("prometheus_client")

from apar_rt import LLM, SamplingParams  # noqa: E402
from apar_rt.serve.engine_loop import LoopStats  # noqa: E402
from apar_rt.serve.metrics import ServingMetrics  # noqa: E402


@pytest.fixture(scope="module")
def medusa_llm(tmp_path_factory):
    from apar_rt.medusa.heads import MedusaHeads
    from apar_rt.testing.tiny_model import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_medusa_metrics")
    hf, _ = make_tiny_checkpoint(path, seed=3)
    heads = MedusaHeads.init_from_lm_head(hf.lm_head.weight.detach(), num_heads=4)
    heads.save(path / "medusa")
    return LLM(str(path), dtype="float32", device="cpu", medusa=True, medusa_tree="tiny_9", acceptance="greedy",
               raw=True)


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("apar_rt_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_medusa_step_counters_count_only_draft_tree_steps(medusa_llm):
    m = ServingMetrics(medusa_llm.engine)
    sampled = medusa_llm.generate(["one two three"], SamplingParams(max_tokens=12, temperature=1.0, seed=1))[0]
    assert sampled.stats["generated_tokens"] > 0
    assert sampled.stats["accepted_length_histogram"] == {}, "no drafts for sampled requests under greedy acceptance"
    m.on_finish(0.1, "length", 3, sampled.stats["generated_tokens"], sampled.stats)
    s = _samples(m.render().decode())
    assert s["apar_rt_medusa_thread_steps_total"] == 0 and s["apar_rt_medusa_accepted_tokens_total"] == 0
    greedy = medusa_llm.generate(["one two three"], SamplingParams(max_tokens=24))[0]
    hist = {int(k): v for k, v in greedy.stats["accepted_length_histogram"].items()}
    assert 0 < sum(hist.values()) <= greedy.stats["decode_steps"]
    m.on_finish(0.1, "length", 3, greedy.stats["generated_tokens"], greedy.stats)
    s = _samples(m.render().decode())
    assert s["apar_rt_medusa_thread_steps_total"] == sum(hist.values())
    assert s["apar_rt_medusa_accepted_tokens_total"] == sum(k * v for k, v in hist.items())
    assert s["apar_rt_medusa_accepted_tokens_per_step"] == pytest.approx(greedy.stats["accepted_tokens_per_step"])


def test_no_medusa_metrics_without_medusa_and_kv_usage(tiny_gqa):
    llm = LLM(str(tiny_gqa[0]), dtype="float32", device="cpu")
    m = ServingMetrics(llm.engine)
    m.on_stats(LoopStats(running=2, waiting=1, kv_blocks_used=30, kv_blocks_total=120, forks=4, live_branches=5))
    text = m.render().decode()
    assert "medusa" not in text
    s = _samples(text)
    assert s["apar_rt_kv_cache_usage_perc"] == 0.25 and s["apar_rt_num_live_branches"] == 5
    assert s["apar_rt_num_requests_running"] == 2 and s["apar_rt_num_requests_waiting"] == 1
    assert s["apar_rt_forks_total"] == 4
    torch.manual_seed(0)
