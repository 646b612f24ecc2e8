"""TensorRT plans executed: build, --check, and greedy tokens against the torch backend.

Needs a TensorRT library and an NVIDIA GPU the plan can target: full TensorRT on any GPU it
supports, or TensorRT-RTX on an RTX-class GPU (compute capability 8.6, 8.9, 12.x). Everything
here skips, with the reason, otherwise. Builds without a GPU are in tests/test_tensorrt_build.py.
"""

from __future__ import annotations

import pytest

from apar_rt.trt import library

try:
    LIB = library.load()
except library.TensorRTUnavailable as e:
    pytest.skip(f"no TensorRT library: {e}", allow_module_level=True)
trt = LIB.module
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip(f"{LIB.label} is installed but no CUDA device is visible to torch, so no plan can run here",
                allow_module_level=True)
_p = torch.cuda.get_device_properties(0)
if LIB.rtx and f"{_p.major}.{_p.minor}" not in library.RTX_DEFAULT_TARGETS:
    pytest.skip(f"{LIB.label} plans run on RTX-class GPUs ({', '.join(library.RTX_DEFAULT_TARGETS)}); "
                f"{_p.name} is compute capability {_p.major}.{_p.minor}", allow_module_level=True)

from apar_rt import LLM, SamplingParams  # noqa: E402
from apar_rt.build.builder import BuildOptions, build  # noqa: E402
from apar_rt.build.manifest import verify_engine_dir  # noqa: E402

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip"]


@pytest.fixture(scope="module", params=["float32", "float16"])
def trt_engine(request, tiny_gqa, tmp_path_factory):
    path, _, _ = tiny_gqa
    out = tmp_path_factory.mktemp("trt") / request.param
    cache = out.parent / "timing.cache"
    opts = BuildOptions(model=str(path), output=str(out), backend="tensorrt", dtype=request.param,
                        block_size=4, max_batch_size=8, batch_buckets=(1, 2, 4, 8), max_num_tokens=64,
                        max_seq_len=128,
                        max_num_blocks=256, timing_cache=str(cache), check=True)
    res = build(opts, progress=False, log=lambda m: None)
    return path, res, cache, request.param


def test_build_records_profiles_and_attention(trt_engine):
    _, res, cache, dtype = trt_engine
    m = verify_engine_dir(res.output, backend="tensorrt")
    eng = m.engines[0]
    assert (eng["library"], eng["library_version"]) == (LIB.name, LIB.version)
    assert [p["batch"] for p in eng["profiles"] if p["kind"] == "decode"] == [1, 2, 4, 8]
    for p in eng["profiles"]:
        mn, opt, mx = p["shapes"]["block_tables"]
        assert mn[0] == opt[0] == mx[0] == p["batch"]
    assert eng["attention"] in ("plugin", "function")
    assert eng["file"] in m.files and (cache.is_file() or LIB.rtx)
    assert any(r.runner == "trt" for r in res.check.runs)
    assert res.check.passed, res.check.summary()


def test_greedy_tokens_match_torch(trt_engine):
    path, res, _, dtype = trt_engine
    kw = dict(mode="ar", raw=True, num_blocks=40, block_size=4, max_num_tokens=32, max_num_seqs=8)
    got = LLM(str(res.output), backend="tensorrt", **kw).generate(PROMPTS, SamplingParams(max_tokens=16))
    want = LLM(str(path), backend="torch", dtype=dtype, device="cuda", **kw).generate(
        PROMPTS, SamplingParams(max_tokens=16))
    same = sum(a.branches == b.branches for a, b in zip(got, want))
    if dtype == "float32":
        assert same == len(PROMPTS)
    else:   # fp16 kernels may break near-ties differently; most prompts still agree
        assert same >= len(PROMPTS) - 1
