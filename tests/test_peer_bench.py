"""`apar-rt bench generate --peer onnxruntime-genai`: the peer's own build of the same HF folder
greedy-decodes the same tokens as apar-rt's onnxruntime engine (so the benchmark compares like
with like), and a missing peer gets an install hint."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from apar_rt.bench import peer as peer_mod


def test_missing_peer_says_how_to_install(tiny_gqa, monkeypatch):
    from apar_rt.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)   # as if not installed
    with pytest.raises(peer_mod.PeerUnavailable, match="pip install onnxruntime-genai"):
        peer_mod.import_genai()
    path, _, _ = tiny_gqa
    res = CliRunner().invoke(main, ["bench", "generate", "--model", str(path), "--peer", "onnxruntime-genai"])
    assert res.exit_code != 0 and "pip install onnxruntime-genai" in res.output


@pytest.fixture(scope="module")
def both(tiny_gqa, tmp_path_factory):
    """apar-rt's onnxruntime engine and the peer's own build of the same tiny folder."""
    pytest.importorskip("onnxruntime_genai")
    from apar_rt.bench.backends import _ort_llm
    from apar_rt.build.builder import BuildOptions, build

    path, _, _ = tiny_gqa
    tmp = tmp_path_factory.mktemp("peer")
    engine = build(BuildOptions(model=str(path), output=str(tmp / "ours"), block_size=4, max_batch_size=4),
                   progress=False, log=lambda m: None).output
    peer = peer_mod.Peer(peer_mod.build_peer_model(str(path), tmp / "peer", threads=1, log=lambda m: None))
    llm = _ort_llm(str(engine), 1, {"mode": "ar", "max_num_seqs": 4})
    return llm, peer


def test_peer_greedy_tokens_equal_apar_rt(both):
    from apar_rt import SamplingParams

    llm, peer = both
    ids = [llm.engine.encode(p) for p in ("one two three", "the list of water and sleep and food")]
    ours = [o.branches[0]["token_ids"][-12:]
            for o in llm.generate(prompt_token_ids=ids, params=SamplingParams(max_tokens=12, ignore_eos=True))]
    theirs = [peer.generate([i], 12, ignore_eos=True)[0] for i in ids]   # batch 1: no padding
    assert [list(map(int, t)) for t in ours] == theirs
    assert peer.generate(ids, 12, ignore_eos=True) == theirs    # in one padded batch too


def test_input_len_past_the_models_positions_is_refused(tiny_gqa):
    from apar_rt.cli import main
    from apar_rt.config import ModelConfig

    path, _, _ = tiny_gqa
    limit = ModelConfig.from_dir(path).max_position_embeddings
    res = CliRunner().invoke(main, ["bench", "generate", "--model", str(path), "--peer", "onnxruntime-genai",
                                    "--input-len", str(limit), "--max-tokens", "8"])
    assert res.exit_code == 2 and "--input-len" in res.output and f"{limit} positions" in res.output, res.output


def test_decode_steps_are_timed_on_both_sides(both):
    """The decode-step column times exactly the steps in which every sequence decodes: 6 tokens
    each are the prefill's first token and 5 decode steps, on both sides."""
    from apar_rt import SamplingParams

    llm, peer = both
    ids = [llm.engine.encode(p) for p in ("one two three", "the list of water and sleep and food")]
    ours = peer_mod.decode_step_times(llm.engine)
    llm.generate(prompt_token_ids=ids, params=SamplingParams(max_tokens=6, ignore_eos=True))
    theirs: list[float] = []
    peer.generate(ids, 6, ignore_eos=True, step_times=theirs)
    assert len(ours) == 5 and len(theirs) == 5
    assert all(t > 0 for t in ours + theirs)
    rows = peer_mod.format_rows([{"batch": 2, "input_len": 5.0, "apar_rt_ar_tok_s": 1.0, "peer_ar_tok_s": 2.0,
                                  "ar_ratio": 0.5, "apar_rt_decode_ms": None, "peer_decode_ms": None,
                                  "decode_ratio": None}])
    assert rows.splitlines()[1].split()[5:8] == ["-", "-", "-"]   # --max-tokens 1: no decode step


def test_apar_runs_get_the_engines_seats_unless_told(both, tiny_gqa):
    """With only `batch` seats the fair share is one seat per request and no request can fork, so
    the APAR runs default to the engine's --max-batch-size; more than that is refused up front."""
    from apar_rt.cli import main

    llm, _ = both
    engine = str(llm.engine.backend.engine_dir)   # built with --max-batch-size 4
    assert peer_mod.apar_seats(engine, None) == 4 and peer_mod.apar_seats(engine, 3) == 3
    with pytest.raises(ValueError, match="--apar-max-num-seqs 5 exceeds the engine's --max-batch-size 4"):
        peer_mod.apar_seats(engine, 5)
    res = CliRunner().invoke(main, ["bench", "generate", "--model", str(tiny_gqa[0]), "--engine", engine, "--peer",
                                    "onnxruntime-genai", "--apar-max-num-seqs", "5"])
    assert res.exit_code == 2 and "--apar-max-num-seqs" in res.output and "--max-batch-size 4" in res.output, \
        res.output


def test_apar_medusa_tree_is_checked_before_anything_runs(both, tiny_gqa, tmp_path):
    """--apar-medusa-tree: refused up front without heads, with an unknown or too deep tree, or
    without --prompts; with heads, the APAR runs' engine verifies that tree."""
    import shutil

    from apar_rt.build.builder import BuildOptions, build
    from apar_rt.cli import main
    from apar_rt.medusa.heads import MedusaHeads

    llm, _ = both
    path, hf, _ = tiny_gqa
    no_heads = str(llm.engine.backend.engine_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one two three"}\n')
    base = ["bench", "generate", "--model", str(path), "--peer", "onnxruntime-genai", "--prompts", str(prompts)]
    for extra, says in ((["--engine", no_heads, "--apar-medusa-tree", "chain_3"], "built without Medusa heads"),
                        (["--apar-medusa-tree", "chain_3"], "has no medusa/ folder"),
                        (["--engine", no_heads, "--apar-medusa-tree", "no_such_tree"], "neither a tree preset")):
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code == 2 and "--apar-medusa-tree" in res.output and says in res.output, res.output
    res = CliRunner().invoke(main, base[:-2] + ["--engine", no_heads, "--apar-medusa-tree", "chain_3"])
    assert res.exit_code == 2 and "need --prompts" in res.output, res.output
    res = CliRunner().invoke(main, base + ["--engine", no_heads, "--apar-speculative-disable-by-batch-size", "4"])
    assert res.exit_code == 2 and "needs --apar-medusa-tree" in res.output, res.output

    model = tmp_path / "model"
    shutil.copytree(path, model)
    MedusaHeads.init_from_lm_head(hf.lm_head.weight.detach(), num_heads=3).save(model / "medusa")
    engine = str(build(BuildOptions(model=str(model), output=str(tmp_path / "engine"), block_size=4,
                                    max_batch_size=4), progress=False, log=lambda m: None).output)
    peer_mod.check_apar_medusa("chain_3", engine, str(model))
    peer_mod.check_apar_medusa("chain_3", None, str(model))
    with pytest.raises(ValueError, match="at most as deep as the number of heads"):
        peer_mod.check_apar_medusa("mc_sim_7b_63", engine, str(model))
    ours = peer_mod._ours(engine, "apar", 1, 4, "chain_3")
    assert ours.engine.verifier is not None and ours.engine.verifier.tree.name == "chain_3"
    # --apar-speculative-disable-by-batch-size: with a limit of one sequence no step drafts after
    # the first, so no tree is ever verified; without one, trees are
    from apar_rt import SamplingParams

    ids = [ours.engine.encode("one two three")]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert ours.generate(prompt_token_ids=ids, params=params)[0].stats["accepted_length_histogram"]
    # step_split: every step counted, the heads' drafting runs timed apart, the timers gone after
    before = ours.engine.num_steps
    split = peer_mod.step_split(ours.engine, lambda: ours.generate(prompt_token_ids=ids, params=params))
    assert split["apar_rt_apar_steps"] == ours.engine.num_steps - before > 0
    shares = [split[f"apar_rt_apar_{k}_share"] for k in ("forward", "heads", "engine")]
    assert all(0 < x < 1 for x in shares) and sum(shares) == pytest.approx(1.0)
    assert not {"step", "forward", "medusa_topk"} & (vars(ours.engine).keys() | vars(ours.engine.backend).keys())
    limited = peer_mod._ours(engine, "apar", 1, 4, "chain_3", 1)
    assert limited.generate(prompt_token_ids=ids, params=params)[0].stats["accepted_length_histogram"] == {}
    row = {"batch": 1, "input_len": 5.0, "apar_rt_ar_tok_s": 1.0, "peer_ar_tok_s": 2.0, "ar_ratio": 0.5,
           "apar_rt_decode_ms": 1.0, "peer_decode_ms": 2.0, "decode_ratio": 2.0, "apar_rt_apar_req_s": 3.0,
           "peer_ar_req_s": 2.0, "req_ratio": 1.5, "req_ratio_waves": 1.2, "apar_max_num_seqs": 4,
           "apar_medusa_tree": "chain_3"}
    assert peer_mod.format_rows([row]).splitlines()[1].split()[-2:] == ["4", "chain_3"]
    row["apar_speculative_disable_by_batch_size"] = 8
    assert peer_mod.format_rows([row]).splitlines()[1].split()[-1] == "chain_3@8"
    row.update(split)
    assert peer_mod.format_rows([row]).splitlines()[2].strip().startswith("apar-rt APAR in flight: ")


def test_ratios_are_taken_within_rounds():
    """A ratio is the median of the rounds' own ratios, so a round in which the machine ran slow for
    both runs moves neither against the other. Below, the ratio of the medians (apar-rt 1 s, the
    peer 2 s) would say 2.0, though the two tied in two rounds of three."""
    ta, tb = [1.0, 1.0, 4.0], [1.0, 2.0, 4.0]   # round 2: the peer slow alone; round 3: both slow
    assert peer_mod._round_ratio(ta, tb, 10, 10) == 1.0
    assert peer_mod._round_ratio([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 10, 10) == 2.0
    assert peer_mod._round_ratio([1.0], [1.0], 30, 10) == 3.0   # work per run counts


def test_prompt_set_rounds_run_each_side_back_to_back(both, monkeypatch, tmp_path):
    """On a prompt set each round runs the whole set on apar-rt with `batch` in flight, in the
    peer's waves, and apar-rt in those waves, back to back (the two apar-rt runs swapping places
    every other round, the peer's between them): after apar-rt's AR pass (for the answers'
    lengths), a warm round and `repeats` rounds; then the peer's to-EOS pass."""
    llm, peer = both
    engine = str(llm.engine.backend.engine_dir)
    calls: list[tuple[str, int]] = []
    make = peer_mod._ours
    in_flight = peer_mod.in_flight

    def watched_in_flight(llm, ids, params, concurrency):
        calls.append((f"ours-in-flight-{concurrency}", len(ids)))
        return in_flight(llm, ids, params, concurrency)

    def watched_ours(*args, **kwargs):
        ours = make(*args, **kwargs)
        generate = ours.generate
        mode = args[1]

        def gen(*a, **k):
            calls.append((f"ours-{mode}", len(k["prompt_token_ids"])))
            return generate(*a, **k)

        ours.generate = gen
        return ours

    peer_generate = peer.generate

    def watched_peer(ids, *a, **k):
        calls.append(("peer", len(ids)))
        return peer_generate(ids, *a, **k)

    monkeypatch.setattr(peer_mod, "_ours", watched_ours)
    monkeypatch.setattr(peer_mod, "in_flight", watched_in_flight)
    monkeypatch.setattr(peer, "generate", watched_peer)
    prompts = [{"prompt": p} for p in ("one two three", "water and sleep", "the list of food")]
    row = peer_mod._requests_per_s(engine, peer, prompts, 2, 6, 2, 1, 4)
    waves = [2, 1]
    flight, peer_waves, ours_waves = [("ours-in-flight-2", 3)], [("peer", w) for w in waves], [("ours-apar", w) for w in waves]
    rounds = [c for r in (0, 0, 1) for c in ((flight + peer_waves + ours_waves) if r % 2 == 0   # warm, then 2
                                             else (ours_waves + peer_waves + flight))]
    split = [("ours-in-flight-2", 3)]   # untimed: where the steps' time goes
    assert calls == [("ours-ar", 3)] + rounds + split + [("peer", w) for w in waves]
    assert row["prompts"] == 3 and row["peer_ar_req_s"] > 0
    assert row["apar_rt_apar_steps"] > 0 and row["apar_rt_apar_step_ms"] > 0
    assert row["apar_rt_apar_heads_share"] == 0.0 < row["apar_rt_apar_forward_share"] < 1   # no draft tree
    assert 0 < row["apar_rt_apar_engine_share"] < 1
    assert row["apar_rt_apar_req_s"] > 0 and row["apar_rt_apar_waves_req_s"] > 0
    assert row["req_ratio"] > 0 and row["req_ratio_waves"] > 0


def test_in_flight_refills_each_freed_place_and_answers_as_waves_do(both):
    """`in_flight` keeps `concurrency` requests in the engine while prompts remain (a finished
    one's place goes to the next prompt before the next step) and never more; the greedy texts are
    those of the same prompts generated in waves."""
    from apar_rt import SamplingParams

    llm, _ = both
    engine = llm.engine
    ids = [engine.encode(p) for p in ("one two three", "water and sleep and food", "the list", "a b c d e",
                                      "sleep", "the water of the list")]
    params = [SamplingParams(max_tokens=n) for n in (3, 6, 2, 5, 4, 1)]   # places free up one by one
    step, held, added = engine.step, [], [0]
    add = engine.add_request

    def counted_add(*a, **k):
        added[0] += 1
        return add(*a, **k)

    def watched_step():
        held.append((len(engine._requests), added[0]))
        return step()

    engine.step, engine.add_request = watched_step, counted_add
    try:
        texts = peer_mod.in_flight(llm, ids, params, 2)
    finally:
        engine.step, engine.add_request = step, add
    assert all(n == 2 for n, a in held if a < len(ids))          # full while prompts remain
    assert max(n for n, _ in held) == 2 and added[0] == len(ids)
    waves = [o.text for w in range(0, len(ids), 2)
             for o in llm.generate(prompt_token_ids=ids[w:w + 2], params=params[w:w + 2])]
    assert texts == waves and all(texts)


def test_in_flight_refuses_to_count_a_failed_request_as_served(both):
    """A request that fails inside the engine finishes early; a requests/s figure that counted it
    would be too high, so `in_flight` raises with the engine's message instead."""
    import math

    from apar_rt import SamplingParams

    llm, _ = both
    ids = [llm.engine.encode(p) for p in ("one two three", "water and sleep", "the list")]
    bad = SamplingParams(max_tokens=4, temperature=0.8, seed=3)
    object.__setattr__(bad, "logit_bias", ((5, math.nan),))   # what validation refuses: a NaN logit
    good = SamplingParams(max_tokens=4)
    assert all(peer_mod.in_flight(llm, ids, good, 2))
    with pytest.raises(RuntimeError, match="failed request .* not finite"):
        peer_mod.in_flight(llm, ids, [good, bad, good], 2)
    assert not llm.engine.has_unfinished()
    assert peer_mod.in_flight(llm, ids, good, 2) == peer_mod.in_flight(llm, ids, good, 1)


def test_the_comparison_script_names_an_unknown_benchmark_before_it_installs_anything(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "samples/bench_vs_onnxruntime_genai.sh"
    env = dict(os.environ, APAR_VENV=str(tmp_path / "venv"))
    r = subprocess.run(["bash", str(script), str(tmp_path / "out"), "demo", "speed"], env=env, check=False,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown benchmark 'speed': choose from demo, wide, random, overhead" in r.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()
