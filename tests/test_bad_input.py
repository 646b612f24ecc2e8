"""Bad input gets a clear error that names the problem, and the other requests still finish."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apar_rt import LLM, SamplingParams
from apar_rt.cli import main
from apar_rt.config import ModelLoadError


def run_cli(*args):
    return CliRunner().invoke(main, list(args))


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    r = run_cli("generate", "--model", str(tmp_path / "nope"), "hi")
    assert r.exit_code != 0 and "does not exist" in r.output


def test_folder_without_config(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path), "hi")
    assert r.exit_code != 0 and "no config.json" in r.output


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                      "vocab_size": 10}))
    r = run_cli("generate", "--model", str(tmp_path), "hi")
    assert r.exit_code != 0 and "unsupported architecture" in r.output and "GPT2LMHeadModel" in r.output


def test_weights_that_do_not_match(tmp_path, tiny_gqa):
    import shutil
    path, _, _ = tiny_gqa
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing"):
        LLM(str(tmp_path))


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"logit_bias": {5: 500.0}}, "logit_bias"),
    ({"stop": 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop_token_ids": 7}, "stop_token_ids"),
    ({"logit_bias": 1.5}, "logit_bias"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_none_means_none_for_the_collection_fields():
    """As vLLM's SamplingParams takes them: stop, stop_token_ids and logit_bias of None are empty."""
    p = SamplingParams(stop=None, stop_token_ids=None, logit_bias=None)
    assert (p.stop, p.stop_token_ids, p.logit_bias) == ((), (), ())
    assert SamplingParams(stop="x", stop_token_ids=[3, 4]).stop == ("x",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=iter([4])).stop_token_ids == (4,)


@pytest.mark.parametrize("flag,value,name", [("--max-tokens", "0", "--max-tokens"),
                                             ("--temperature", "-1", "--temperature"),
                                             ("--top-p", "1.5", "--top-p"), ("--top-p", "0", "--top-p"),
                                             ("--logit-bias", "12", "--logit-bias")])
def test_cli_names_the_bad_flag(tiny_gqa, flag, value, name):
    path, _, _ = tiny_gqa
    r = run_cli("generate", "--model", str(path), flag, value, "hi")
    assert r.exit_code == 2 and name in r.output


def test_prompt_longer_than_context_fails_alone(tiny_gqa):
    path, _, tok = tiny_gqa
    llm = LLM(str(path), raw=True, max_model_len=64, num_blocks=64, block_size=4)
    long_prompt = " ".join(["water"] * 200)
    outs = llm.generate(["one two three", long_prompt, "tree fork"], SamplingParams(max_tokens=8))
    assert outs[1].error and "context is 64 tokens" in outs[1].error
    assert outs[1].finish_reason.value == "error"
    for o in (outs[0], outs[2]):
        assert o.error is None and o.stats["generated_tokens"] >= 1
    assert llm.engine.scheduler.pool.num_used == 0


def test_num_blocks_too_small_for_any_request(tiny_gqa):
    path, _, _ = tiny_gqa
    r = run_cli("generate", "--model", str(path), "--num-blocks", "3", "--block-size", "4", "--raw",
                "one two three four five six seven eight nine ten", "--json")
    assert r.exit_code == 1
    assert "KV cache is too small" in r.output and "--num-blocks 3" in r.output


def test_request_that_outgrows_the_pool_fails_and_others_finish(tiny_gqa):
    """A request whose generation needs more blocks than exist ends with an error; the rest finish."""
    path, _, _ = tiny_gqa
    llm = LLM(str(path), raw=True, mode="ar", num_blocks=9, block_size=4)
    p = [SamplingParams(max_tokens=6), SamplingParams(max_tokens=60, ignore_eos=True), SamplingParams(max_tokens=6)]
    outs = llm.generate(["one two", "three four", "tree fork"], p)
    assert outs[1].error and "KV cache is too small" in outs[1].error
    assert outs[0].error is None and outs[2].error is None
    assert llm.engine.scheduler.pool.num_used == 0


def test_unknown_backend_lists_valid_names():
    from apar_rt.backends import backend_class
    with pytest.raises(ValueError, match="torch, onnxruntime, tensorrt"):
        backend_class("vllm")


def test_bad_engine_sizes():
    from apar_rt.config import EngineConfig
    with pytest.raises(ValueError, match="num_blocks"):
        EngineConfig(num_blocks=1)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="mode"):
        EngineConfig(mode="fast")
