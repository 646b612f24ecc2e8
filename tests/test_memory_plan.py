"""The memory planner against real engines: weight bytes of the ONNX file, the pool the onnxruntime
backend allocates, and the peak RSS of `apar-rt serve` with a full pool; plus its CLI and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from apar_rt import memory_plan as mp
from apar_rt.build.builder import BuildError, BuildOptions, build
from apar_rt.build.manifest import read_manifest
from apar_rt.cli import main
from apar_rt.config import ModelConfig

DEMO = Path(__file__).resolve().parents[1] / "samples" / "models" / "apar-tiny"
LLAMA_7B = Path(__file__).resolve().parents[1] / "samples" / "configs" / "llama-2-7b.json"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def initializer_bytes(onnx_path) -> int:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    return sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    """The demo model (with its Medusa heads) built with --fit cpu --memory-gib 1."""
    out = tmp_path_factory.mktemp("plan") / "demo"
    build(BuildOptions(model=str(DEMO), output=str(out), fit="cpu", memory_gib=1.0), progress=False,
          log=lambda m: None)
    return out


def test_weight_bytes_equal_the_engine_files(demo_engine):
    p = mp.plan_from_folder(str(demo_engine), mp.get_device("cpu", 1.0))
    assert p.weights["medusa"] > 0
    assert p.weight_bytes == initializer_bytes(demo_engine / "model.onnx")
    size = sum((demo_engine / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    assert 0 < size - p.weight_bytes < 200_000, "the files are the weights plus the graph's ~100 kB"


def test_7b_weights_are_its_parameter_count():
    cfg = ModelConfig.from_hf_dict(json.loads(LLAMA_7B.read_text()))
    w = mp.weight_breakdown(cfg, "float16")
    assert sum(w.values()) == 6_738_415_616 * 2          # Llama-2-7B's published parameter count
    q4 = mp.weight_breakdown(cfg, "float16", mp.QuantSpec("int4", 128))
    # int4 in groups of 128 with fp16 scales: 4.125 bits per linear weight; embeddings, LM head stay fp16
    linear = sum(k * n for _, k, n in mp._linears(cfg)) * cfg.num_hidden_layers
    assert q4["layers"] == linear * 33 // 64 + 2 * cfg.hidden_size * 2 * cfg.num_hidden_layers
    assert q4["embeddings"] == q4["lm_head"] == w["lm_head"]


def test_fit_sets_max_num_blocks_and_backend_pool_matches(demo_engine):
    from apar_rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    m = read_manifest(demo_engine)
    p = mp.plan_from_folder(str(demo_engine), mp.get_device("cpu", 1.0))
    assert m.max_num_blocks == p.num_blocks == m.memory_plan["num_blocks"]
    be = OnnxRuntimeBackend(str(demo_engine))
    be.allocate_kv(p.num_blocks, p.block_size)
    pool = sum(t.nbytes for t in (*be.k_caches, *be.v_caches))
    assert be.kv_bytes_per_block() == p.kv_bytes_per_block
    assert pool == p.kv_pool_bytes
    with pytest.raises(ValueError, match="exceeds the engine's max_num_blocks"):
        be.allocate_kv(p.num_blocks + 1, p.block_size)


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_serve_peak_rss_within_15_percent_of_the_plan(demo_engine):
    import httpx

    from apar_rt.bench.serving import ServeProcess

    p = mp.plan_from_folder(str(demo_engine), mp.get_device("cpu", 1.0))
    sp = ServeProcess(str(demo_engine), "apar", ["--backend", "onnxruntime", "--num-blocks", str(p.num_blocks)],
                      log=lambda m: None)
    try:
        r = httpx.post(sp.url + "/v1/completions", timeout=120,
                       json={"model": "bench", "prompt": "Give me 3 tips for better sleep.", "max_tokens": 64,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        measured = _peak_rss(sp.proc.pid)
    finally:
        sp.close()
    predicted = p.total_bytes
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_plan_cli_json_and_table():
    res = cli("plan", "--model", LLAMA_7B, "--device", "orin-nano-8gb", "--quantize", "int4",
              "--max-num-tokens", 512, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["quantization"] == "int4" and d["group_size"] == 128 and d["num_blocks"] > 1
    rest = d["usable_bytes"] - d["weight_bytes"] - d["activation_bytes"]
    assert d["num_blocks"] == int(rest * 0.9) // d["kv_bytes_per_block"] + 1
    assert d["total_bytes"] - d["reserved_bytes"] <= d["usable_bytes"]
    assert d["kv_pool_bytes"] == d["num_blocks"] * d["kv_bytes_per_block"]
    assert d["kv_bytes_per_block"] == 2 * 32 * 16 * 32 * 128 * 2
    table = cli("plan", "--model", LLAMA_7B, "--device", "rtx-4090", "--gpu-memory-utilization", 0.9)
    assert table.exit_code == 0 and "AR sequences" in table.output and "(1 of the rest)" in table.output


def test_kv_fraction_and_utilization_semantics():
    cfg = ModelConfig.from_hf_dict(json.loads(LLAMA_7B.read_text()))
    dev = mp.get_device("h100-80gb")
    a = mp.plan(cfg, dev, gpu_memory_utilization=0.9)            # vLLM: the rest of 90% is KV
    assert a.kv_cache_fraction == 1.0
    free = int(dev.memory_bytes * 0.9) - dev.reserved_bytes - a.weight_bytes - a.activation_bytes
    assert a.num_blocks == free // a.kv_bytes_per_block + 1
    b = mp.plan(cfg, dev, kv_cache_fraction=0.5)
    assert b.gpu_memory_utilization == 1.0
    assert b.num_blocks == int((dev.memory_bytes - dev.reserved_bytes - b.weight_bytes - b.activation_bytes)
                               * 0.5) // b.kv_bytes_per_block + 1
    c = mp.plan(cfg, dev, context=2048, max_seq_len=4096, apar_branches=4)
    assert c.ar_sequences == (c.num_blocks - 1) // 128
    assert c.apar_requests == (c.num_blocks - 1) // (128 + 8)


def test_bad_inputs_name_the_numbers():
    cfg = ModelConfig.from_hf_dict(json.loads(LLAMA_7B.read_text()))
    with pytest.raises(mp.PlanError, match=r"--group-size must be a power of two >= 16 .*got 96"):
        mp.plan(cfg, mp.get_device("rtx-4090"), quant=mp.QuantSpec("int4", 96))
    with pytest.raises(mp.PlanError, match=r"--group-size 512 does not divide down_proj's 11008 input"):
        mp.plan(cfg, mp.get_device("rtx-4090"), quant=mp.QuantSpec("int4", 512))
    big = ModelConfig.from_hf_dict({**json.loads(LLAMA_7B.read_text()), "hidden_size": 8192,
                                    "intermediate_size": 28672, "num_hidden_layers": 80,
                                    "num_attention_heads": 64, "num_key_value_heads": 8})
    with pytest.raises(mp.PlanError, match=r"does not fit orin-nano-8gb.*at int4.*even at int4"):
        mp.plan(big, mp.get_device("orin-nano-8gb"), quant=mp.QuantSpec("int4"))
    with pytest.raises(mp.PlanError, match=r"12\.55 GiB at float16.*Pass --quantize int4"):
        mp.plan(cfg, mp.get_device("orin-nano-8gb"), max_num_tokens=512)
    with pytest.raises(mp.PlanError, match="needs --memory-gib"):
        mp.get_device("cpu")
    with pytest.raises(mp.PlanError, match="unknown device 'orin'; known: orin-nano-8gb"):
        mp.get_device("orin")
    res = cli("plan", "--model", LLAMA_7B, "--device", "rtx-4090", "--kv-cache-fraction", 1.5)
    assert res.exit_code != 0 and "--kv-cache-fraction must be in (0, 1], got 1.5" in res.output
    with pytest.raises(BuildError, match="--fit cpu sets --max-num-blocks"):
        build(BuildOptions(model=str(DEMO), output="/nonexistent/x", fit="cpu", memory_gib=1, max_num_blocks=9))
    with pytest.raises(BuildError, match="does not fit cpu"):
        build(BuildOptions(model=str(DEMO), output="/nonexistent/x", fit="cpu", memory_gib=0.1))
