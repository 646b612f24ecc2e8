"""Real TensorRT builds on this CPU machine (TensorRT-RTX builds ahead of time without a GPU).

What this proves: `apar-rt build --backend tensorrt` parses model.onnx in a real TensorRT, inlines
the attention function, builds and serializes a plan with decode and prefill profiles for the
tiny checkpoint and the demo model, and records library, version and GPU targets; tampering is
refused; bad input is a clear error. What it does not: running a plan (no GPU here; the lent
H200 cannot run TensorRT-RTX plans) - tests/test_tensorrt.py holds the execution tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from apar_rt.build.manifest import MANIFEST_NAME, EngineLoadError, verify_engine_dir
from apar_rt.cli import main
from apar_rt.trt import library

try:
    LIB = library.load()
except library.TensorRTUnavailable as e:
    pytest.skip(f"no TensorRT library here ({e}); samples/setup_and_test.sh installs tensorrt-rtx-cu13",
                allow_module_level=True)

DEMO = Path(__file__).resolve().parents[1] / "samples" / "models" / "apar-tiny"
SMALL = ["--max-batch-size", 2, "--max-num-tokens", 16, "--max-seq-len", 64, "--block-size", 8,
         "--max-num-blocks", 64, "--max-prefill-batch", 1, "-q"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_plan(tiny_gqa, tmp_path_factory):
    path, _, _ = tiny_gqa
    out = tmp_path_factory.mktemp("trt_build") / "tiny"
    res = cli("build", "--model", path, "--output", out, "--backend", "tensorrt", *SMALL, "--check")
    assert res.exit_code == 0, res.output
    return path, out, res


def test_tiny_plan_records_library_version_targets_and_profiles(tiny_plan):
    _, out, res = tiny_plan
    m = verify_engine_dir(out, backend="tensorrt")
    eng = m.engines[0]
    assert (eng["library"], eng["library_version"]) == (LIB.name, LIB.version)
    if LIB.rtx:
        assert eng["gpu_targets"] == ["8.6", "8.9", "12.0"]
    assert eng["attention"] == "function" and eng["plugin"] is None and eng["dtype"] == "float16"
    plan = out / eng["file"]
    assert plan.stat().st_size > 100_000 and m.files[eng["file"]]["bytes"] == plan.stat().st_size
    assert [(p["kind"], p["batch"], p["max_tokens"], p["max_q"]) for p in eng["profiles"]] == \
        [("decode", 1, 1, 1), ("decode", 2, 2, 1), ("prefill", 1, 16, 16)]
    for p in eng["profiles"]:     # the batch axis is fixed; the mask is [T, max_q], never [T, T] in decode
        mn, opt, mx = p["shapes"]["block_tables"]
        assert mn[0] == opt[0] == mx[0] == p["batch"]
        assert p["shapes"]["mask"][2] == [p["max_tokens"], p["max_q"]]
    assert "attention: the model-local function was inlined" in res.output
    assert "check [not run]: trt:" in res.output and "no CUDA GPU here" in res.output
    assert "check passed" in res.output       # the ONNX graph itself was checked against torch


def test_demo_model_plan(tmp_path):
    out = tmp_path / "demo"
    res = cli("build", "--model", DEMO, "--output", out, "--backend", "tensorrt", "--batch-buckets", "1,2",
              *SMALL)
    assert res.exit_code == 0, res.output
    m = verify_engine_dir(out, backend="tensorrt")
    assert m.model_config["num_hidden_layers"] == 4 and m.engines[0]["attention"] == "function"
    assert (out / "model.plan").stat().st_size > 1_000_000


def test_tampered_plan_or_manifest_is_refused(tiny_plan, tmp_path):
    _, out, _ = tiny_plan
    copy = tmp_path / "e"
    shutil.copytree(out, copy)
    plan = copy / "model.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineLoadError, match="engine file model.plan is corrupt: sha256"):
        verify_engine_dir(copy, backend="tensorrt")
    shutil.copy(out / "model.plan", plan)
    verify_engine_dir(copy, backend="tensorrt")
    m = json.loads((copy / MANIFEST_NAME).read_text())
    m["engines"][0]["gpu_targets"].append("9.0")          # claim the plan runs on an H100/H200
    (copy / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(EngineLoadError, match="record of engine model.plan has been edited"):
        verify_engine_dir(copy, backend="tensorrt")


def test_plan_refuses_a_gpu_it_was_not_built_for(tiny_plan):
    _, out, _ = tiny_plan
    eng = verify_engine_dir(out, backend="tensorrt").engines[0]
    with pytest.raises(library.PlanNotForThisGPU) as e:
        library.check_device(eng, "9.0", "NVIDIA H200")
    msg = str(e.value)
    assert "NVIDIA H200 has compute capability 9.0" in msg and ", ".join(eng["gpu_targets"]) in msg
    if LIB.rtx:
        assert "TensorRT-RTX plans run only on RTX-class GPUs" in msg
        library.check_device(eng, "8.9", "NVIDIA RTX 4090")      # a target: accepted


def test_gpu_targets_flag(tiny_gqa, tmp_path):
    if not LIB.rtx:
        pytest.skip("full TensorRT builds for the GPU it runs on")
    path, _, _ = tiny_gqa
    r = cli("build", "--model", path, "--output", tmp_path / "x", "--backend", "tensorrt", "--gpu-targets", "9.0",
            *SMALL)
    assert r.exit_code != 0 and "--gpu-targets: 9.0 cannot be targeted" in r.output and "7.5" in r.output
    assert not (tmp_path / "x").exists()


def test_no_tensorrt_library_at_all(tiny_gqa, tmp_path):
    """With neither tensorrt nor tensorrt_rtx importable (blocked in a fresh interpreter)."""
    path, _, _ = tiny_gqa
    code = ("import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None; "
            "from apar_rt.cli import main; sys.argv = ['apar-rt'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", code, "build", "--model", str(path), "--output", str(tmp_path / "t"),
                        "--backend", "tensorrt", "-q"], capture_output=True, text=True, check=False,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0
    assert "no TensorRT library could be imported (import tensorrt:" in r.stderr
    assert "import tensorrt_rtx:" in r.stderr and "pip install tensorrt-rtx-cu13" in r.stderr
    assert "--backend onnxruntime" in r.stderr and not (tmp_path / "t").exists()


def test_pool_over_two_to_the_31_elements_is_refused(tiny_gqa, tmp_path):
    path, _, _ = tiny_gqa
    # tiny: 2 kv heads x head_dim 16 x block 8 = 256 elements a block -> at most 8388607 blocks
    r = cli("build", "--model", path, "--output", tmp_path / "x", "--backend", "tensorrt",
            "--max-num-blocks", 2 ** 23 + 1, "--block-size", 8, "-q")
    assert r.exit_code != 0 and "over TensorRT's limit of 2,147,483,647" in r.output
    assert "at most 8388607 blocks" in r.output and not (tmp_path / "x").exists()


# ---- device memory: decode/prefill profiles, the estimate, and refusals ----------------------------------

SEVEN_B = Path(__file__).resolve().parents[1] / "samples" / "configs" / "llama-2-7b.json"


def test_estimate_weights_are_the_checkpoints_parameters(tiny_gqa):
    """The estimate's weights are the HF model's parameters in float16 (an independent count)."""
    from apar_rt.build.tensorrt_builder import estimate_memory, plan_profiles
    from apar_rt.config import ModelConfig

    path, hf, _ = tiny_gqa
    est = estimate_memory(ModelConfig.from_dir(path), "float16", plan_profiles([1, 2], 16, 1, 1), max_seq_len=64,
                          block_size=8, num_blocks=64, fused_attention=False)
    assert est.weight_bytes == 2 * sum(p.numel() for p in hf.parameters())
    assert est.kv_pool_bytes == 64 * 2 * 2 * 8 * 2 * 16 * 2     # blocks x K,V x layers x block x Hkv x D x fp16
    assert (est.largest.kind, est.largest.batch) == ("prefill", 1)


def test_separate_profiles_shrink_the_h100_recipes_scores():
    """The old single profile per bucket (batch 64 sized for a 4096-token prefill) needed ~275 GB of fallback
    scores in one layer; with decode/prefill profiles the largest profile is a small-batch prefill."""
    from apar_rt import memory_plan as mp
    from apar_rt.build.tensorrt_builder import estimate_memory, plan_profiles

    cfg = _config(SEVEN_B)
    old = mp.activation_bytes(cfg, "float16", max_batch_size=64, max_num_tokens=4096, max_seq_len=4096,
                              block_size=16, max_q=4096)
    assert old > 275e9
    buckets = [1, 2, 4, 8, 16, 32, 64]
    kw = {"max_seq_len": 4096, "block_size": 16, "num_blocks": 2}
    new = estimate_memory(cfg, "float16", plan_profiles(buckets, 4096, 1, 4), fused_attention=False, **kw)
    assert (new.largest.kind, new.largest.batch) == ("prefill", 4) and new.activation_bytes < 40 * 2 ** 30
    one = estimate_memory(cfg, "float16", plan_profiles(buckets, 2048, 1, 1), fused_attention=False, **kw)
    assert one.activation_bytes < new.activation_bytes / 6
    fused = estimate_memory(cfg, "float16", plan_profiles(buckets, 4096, 1, 4), fused_attention=True, **kw)
    assert fused.activation_bytes < one.activation_bytes


def _config(path: Path):
    import tempfile

    from apar_rt.config import ModelConfig

    d = Path(tempfile.mkdtemp())
    shutil.copy(path, d / "config.json")
    return ModelConfig.from_dir(d)


def test_build_reports_the_estimate_before_building_a_7b(tmp_path):
    """`--dry-run` on a folder holding only Llama-2-7B's config.json: the arithmetic needs no weights."""
    shutil.copy(SEVEN_B, tmp_path / "config.json")
    r = cli("build", "--model", tmp_path, "--output", tmp_path / "out", "--backend", "tensorrt", "--dry-run",
            "--max-batch-size", 64, "--max-num-tokens", 2048, "--max-seq-len", 4096, "--max-prefill-batch", 1,
            "--fit", "h100-80gb", "-q")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("device memory estimate:"))
    assert "weights 12.55 GiB" in line and "largest profile: prefill batch 1, 2048 tokens" in line
    assert "target memory: --fit h100-80gb: usable" in r.output and "dry run: nothing written" in r.output
    assert not (tmp_path / "out").exists()


def test_a_profile_that_cannot_fit_is_refused_naming_the_limit(tiny_gqa, tmp_path):
    path, _, _ = tiny_gqa
    r = cli("build", "--model", path, "--output", tmp_path / "x", "--backend", "tensorrt", "--fit", "cpu",
            "--memory-gib", 0.25, "--max-num-tokens", 1024, "--max-seq-len", 512, "--max-batch-size", 8, "-q")
    assert r.exit_code != 0 and "does not fit cpu" in r.output and "exceed the usable" in r.output, r.output
    assert "activations" in r.output and not (tmp_path / "x").exists()
