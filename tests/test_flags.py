"""Flags in the ecosystem's spelling: trtllm-build's underscore aliases on `apar-rt build`, vLLM's
--max-num-batched-tokens at run time, and the warning that names both values when a runtime
limit exceeds the engine's build limit."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from click.testing import CliRunner

from apar_rt import LLM
from apar_rt.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def engine(tiny_gqa, tmp_path_factory):
    """Built with trtllm-build's spellings only."""
    path, _, _ = tiny_gqa
    out = tmp_path_factory.mktemp("flags") / "engine"
    res = cli("build", "--model", path, "--output_dir", out, "--max_batch_size", 2, "--tokens_per_block", 8,
              "--max_num_tokens", 64, "--max_seq_len", 128, "--quiet")
    assert res.exit_code == 0, res.output
    return out


def test_trtllm_build_underscore_aliases(engine):
    m = json.loads((engine / "manifest.json").read_text())
    assert (m["max_batch_size"], m["block_size"], m["max_num_tokens"], m["max_seq_len"]) == (2, 8, 64, 128)


def test_runtime_limits_over_the_build_limits_warn_with_both_values(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="apar_rt"):
        llm = LLM(str(engine), backend="onnxruntime", max_num_seqs=64, max_num_tokens=1000, max_model_len=4096)
    cfg = llm.engine.config
    assert (cfg.max_num_seqs, cfg.max_num_tokens, cfg.max_model_len) == (2, 64, 128)
    text = caplog.text
    assert "--max-num-seqs 64 exceeds the engine's build limit --max-batch-size 2" in text
    assert "--max-num-tokens 1000 exceeds the engine's build limit --max-num-tokens 64" in text
    assert "--max-model-len 4096 exceeds the engine's build limit --max-seq-len 128" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apar_rt"):
        llm = LLM(str(engine), backend="onnxruntime", max_num_seqs=2)
    assert caplog.text == "" and llm.engine.config.max_num_seqs == 2


def _generate(engine, *flags):
    return subprocess.run([sys.executable, "-m", "apar_rt.cli", "generate", "--engine", str(engine),
                           "--max-tokens", "2", *flags, "hi"], capture_output=True, text=True, timeout=120)


def test_cli_warning_and_vllm_alias(engine):
    r = _generate(engine, "--max-num-seqs", "64", "--max-num-batched-tokens", "5000")
    assert r.returncode == 0, r.stderr
    assert "--max-num-seqs 64 exceeds the engine's build limit --max-batch-size 2" in r.stderr
    assert "--max-num-tokens 5000 exceeds the engine's build limit --max-num-tokens 64" in r.stderr
    quiet = _generate(engine)
    assert quiet.returncode == 0 and "exceeds" not in quiet.stderr


def _pool_blocks(r) -> int:
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("KV pool: "))
    return int(line.split()[2])


def test_kv_cache_fraction_and_gpu_memory_utilization_size_the_pool(engine):
    """Shares of --memory-gib on the CPU: half the share, half the pool (the null block aside);
    --gpu-memory-utilization 0.9 takes 10% off the whole budget, so fewer blocks than 1.0."""
    full = _pool_blocks(_generate(engine, "--memory-gib", "1", "--kv-cache-fraction", "1.0"))
    half = _pool_blocks(_generate(engine, "--memory-gib", "1", "--kv-cache-fraction", "0.5"))
    assert abs((full - 1) - 2 * (half - 1)) <= 2 and half > 100
    util = _pool_blocks(_generate(engine, "--memory-gib", "1", "--gpu-memory-utilization", "0.9"))
    assert half < util < full
    no_mem = _generate(engine, "--kv-cache-fraction", "0.5")
    assert no_mem.returncode == 2 and "--memory-gib" in no_mem.stderr
    both = _generate(engine, "--memory-gib", "1", "--kv-cache-fraction", "0.5", "--num-blocks", "64")
    assert both.returncode == 2 and "--num-blocks" in both.stderr


def test_json_error_record_has_the_schema_and_seed_errors_name_the_flag(engine):
    r = _generate(engine, "--json", "--max-tokens", "2", "one " * 400)
    assert r.returncode == 1
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["finish_reason"] == "error" and "context" in rec["error"]
    assert rec["stats"] == {"decode_steps": 0, "forks": 0, "generated_tokens": 0, "peak_kv_blocks": 0,
                            "preemptions": 0, "accepted_tokens_per_step": 0.0, "accepted_length_histogram": {}}
    bad = _generate(engine, "--seed", str(1 << 70), "--temperature", "1")
    assert bad.returncode == 2 and "--seed" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_apar_builds_an_engine_from_a_model_folder(tiny_gqa, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "one two", "structured": True, "kind": "list"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "apar_rt.cli", "bench", "apar", "--model", str(tiny_gqa[0]),
                        "--backend", "onnxruntime", "--prompts", str(prompts), "--max-tokens", "4", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "building a onnxruntime engine" in r.stderr and json.loads(r.stdout)["prompts"] == 1
