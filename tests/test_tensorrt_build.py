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
