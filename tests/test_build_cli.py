"""`apar-rt build` end to end, `generate --engine`, and every bad input a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from apar_rt import LLM, SamplingParams
from apar_rt.build.manifest import MANIFEST_NAME, EngineLoadError, verify_engine_dir
from apar_rt.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tiny_gqa, tmp_path_factory):
    """An engine folder built through the CLI with --check, and the CLI's result."""
    path, _, _ = tiny_gqa
    out = tmp_path_factory.mktemp("build_cli") / "engine"
    res = cli("build", "--model", path, "--output", out, "--block-size", 8, "--max-batch-size", 4,
              "--batch-buckets", "1,2,4", "--max-seq-len", 256, "--check", "--quiet")
    return path, out, res


@pytest.fixture
def engine_copy(built, tmp_path):
    _, out, _ = built
    dst = tmp_path / "engine"
    shutil.copytree(out, dst)
    return dst


def test_build_writes_a_verified_engine_folder_and_checks_it(built):
    path, out, res = built
    assert res.exit_code == 0, res.output
    assert "check [onnxrt via polygraphy]: largest |engine - torch| = " in res.output
    assert "check passed" in res.output and "polygraphy run " in res.output
    m = verify_engine_dir(out, backend="onnxruntime")
    assert (m.backend, m.dtype, m.block_size, m.max_batch_size, m.batch_buckets, m.max_seq_len) == \
        ("onnxruntime", "float32", 8, 4, [1, 2, 4], 256)
    assert set(m.files) >= {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json", "tokenizer_config.json"}
    assert m.onnx["external_data"] == ["model.onnx.data"]     # the weights: what onnxruntime maps (save_model)
    assert (out / "model.onnx.data").stat().st_size > 10 * (out / "model.onnx").stat().st_size
    assert m.control_tokens == {"fork": 3, "child": 4} and m.apar_rt_version
    assert m.onnx["attention"]["block_size"] == 8 and m.onnx["attention"]["plugin_namespace"] == "apar"
    worst = float(res.output.split("largest |engine - torch| = ")[1].split()[0])
    assert worst < 1e-4
    assert not [p for p in out.parent.iterdir() if ".building-" in p.name], "temporary folder left behind"


def test_generate_with_engine_matches_model(built):
    path, out, _ = built
    args = ["--raw", "--mode", "ar", "--max-tokens", 12, "--json", "one two three", "first tip"]
    via_engine = cli("generate", "--engine", out, *args)
    assert via_engine.exit_code == 0, via_engine.output
    via_model = cli("generate", "--model", path, "--max-num-seqs", 4, "--block-size", 8, *args)
    assert via_model.exit_code == 0, via_model.output
    rows = lambda r: [json.loads(x)["branches"] for x in r.output.splitlines() if x.startswith("{")]  # noqa: E731
    assert rows(via_engine) == rows(via_model) and len(rows(via_engine)) == 2


def test_generate_needs_exactly_one_of_model_and_engine(built):
    path, out, _ = built
    for args in ([], ["--model", path, "--engine", out]):
        r = cli("generate", *args, "hi")
        assert r.exit_code == 2 and "--model" in r.output and "--engine" in r.output
    r = cli("generate", "--engine", path, "hi")
    assert r.exit_code != 0 and "not an apar-rt engine folder" in r.output
    r = cli("generate", "--engine", out, "--backend", "torch", "hi")
    assert r.exit_code != 0 and "--backend onnxruntime" in r.output


def test_missing_and_unsupported_models(tmp_path):
    r = cli("build", "--model", tmp_path / "nope", "--output", tmp_path / "out", "-q")
    assert r.exit_code != 0 and "does not exist" in r.output
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                                 "model_type": "gpt2", "vocab_size": 10}))
    r = cli("build", "--model", tmp_path / "gpt2", "--output", tmp_path / "out", "-q")
    assert r.exit_code != 0 and "unsupported architecture" in r.output and "GPT2LMHeadModel" in r.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(built, tmp_path):
    path, _, _ = built
    out = tmp_path / "engine"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    r = cli("build", "--model", path, "--output", out, "-q")
    assert r.exit_code != 0 and "already exists" in r.output and "--force" in r.output
    r = cli("build", "--model", path, "--output", out, "--force", "-q")
    assert r.exit_code != 0 and "refusing to overwrite" in r.output and (out / "something.txt").exists()
    r = cli("build", "--model", path, "--output", path, "--force", "-q")
    assert r.exit_code != 0 and "model folder itself" in r.output


def test_force_rebuilds_an_engine_folder(built, engine_copy):
    path, _, _ = built
    old = json.loads((engine_copy / MANIFEST_NAME).read_text())["created"]
    r = cli("build", "--model", path, "--output", engine_copy, "--force", "--block-size", 4, "-q")
    assert r.exit_code == 0, r.output
    m = verify_engine_dir(engine_copy)
    assert m.block_size == 4 and not (engine_copy / "check").exists() and m.created >= old


def test_corrupt_engine_file_is_a_sha256_error(engine_copy):
    f = engine_copy / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(EngineLoadError, match=r"engine file model.onnx is corrupt: sha256"):
        LLM(str(engine_copy), backend="onnxruntime")
    r = cli("generate", "--engine", engine_copy, "hi")
    assert r.exit_code != 0 and "model.onnx is corrupt" in r.output


def test_truncated_or_missing_files(engine_copy):
    (engine_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(EngineLoadError, match="tokenizer.json is corrupt"):
        verify_engine_dir(engine_copy)
    (engine_copy / "model.onnx").unlink()
    with pytest.raises(EngineLoadError, match="model.onnx is missing"):
        verify_engine_dir(engine_copy)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(apar_rt_version="0.0.1"), "built by apar-rt 0.0.1"),
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m["model_config"].update(num_hidden_layers=3), "fields differ: num_hidden_layers"),
    (lambda m: m.update(format="something-else"), "not an apar-rt engine manifest"),
    (lambda m: m.pop("block_size"), "lacks required fields"),
])
def test_mismatched_manifest(engine_copy, edit, message):
    path = engine_copy / MANIFEST_NAME
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(EngineLoadError, match=message):
        LLM(str(engine_copy), backend="onnxruntime")
    r = cli("generate", "--engine", engine_copy, "--backend", "onnxruntime", "hi")
    assert r.exit_code != 0 and message.split(":")[0] in r.output


def test_edited_config_is_caught(engine_copy):
    text = (engine_copy / "config.json").read_text()
    assert '"rms_norm_eps": 1e-06' in text
    (engine_copy / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 2e-06'))
    with pytest.raises(EngineLoadError, match="config.json is corrupt"):
        verify_engine_dir(engine_copy)
    with pytest.raises(EngineLoadError, match="fields differ: rms_norm_eps"):
        verify_engine_dir(engine_copy, check_hashes=False)


def test_tensorrt_backend_needs_a_tensorrt_engine_folder(built):
    _, out, _ = built
    r = cli("generate", "--engine", out, "--backend", "tensorrt", "hi")
    assert r.exit_code != 0 and "holds no TensorRT engine" in r.output


@pytest.mark.parametrize("flags,message", [
    (["--max-batch-size", 8, "--batch-buckets", "1,16"], "bucket 16 is larger than --max-batch-size 8"),
    (["--max-batch-size", 8, "--batch-buckets", "1,4"], "must include --max-batch-size 8"),
    (["--batch-buckets", "0,8"], "--batch-buckets must hold positive integers"),
    (["--batch-buckets", "a,b"], "not a comma-separated list of integers"),
    (["--max-batch-size", 0], "--max-batch-size must be a positive integer"),
    (["--max-num-tokens", -5], "--max-num-tokens must be a positive integer"),
    (["--block-size", 0], "--block-size must be a positive integer"),
    (["--max-seq-len", 0], "--max-seq-len must be a positive integer"),
    (["--max-seq-len", 100000], "--max-seq-len 100000 exceeds the model's max_position_embeddings 512"),
    (["--max-num-blocks", 1], "--max-num-blocks must be >= 2"),
    (["--dtype", "bfloat16"], "bfloat16 is not supported by the onnxruntime backend"),
    (["--timing-cache", "x.cache"], "--timing-cache applies to --backend tensorrt only"),
    (["--plugin", "python"], "--plugin applies to --backend tensorrt only"),
    (["--backend", "tensorrt", "--plugin", "nope.so"], "--plugin 'nope.so' does not exist"),
    (["--backend", "tensorrt", "--max-prefill-batch", 0], "--max-prefill-batch must be a positive integer"),
])
def test_impossible_sizes_and_options(built, tmp_path, flags, message):
    path, _, _ = built
    r = cli("build", "--model", path, "--output", tmp_path / "out", "-q", *flags)
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_engine_limits_reach_the_engine(built):
    _, out, _ = built
    with pytest.raises(ValueError, match="block size 8"):
        LLM(str(out), backend="onnxruntime", block_size=16)
    llm = LLM(str(out), backend="onnxruntime", mode="ar", raw=True)
    cfg = llm.engine.config
    assert (cfg.block_size, cfg.max_num_seqs, cfg.max_model_len) == (8, 4, 256)
    o = llm.generate(["one two three"], SamplingParams(max_tokens=5))[0]
    assert o.error is None and len(o.branches[0]["token_ids"]) == 5


def test_tensorrt_profiles_separate_decode_and_prefill():
    """The profiles the TensorRT builder sets (pure Python; tests/test_tensorrt_build.py builds them)."""
    from apar_rt.build.tensorrt_builder import plan_profiles, profile_shapes
    from apar_rt.export import step_io

    specs = plan_profiles([1, 2, 4], 64, 1, 2)
    assert [(s.kind, s.batch, s.max_tokens, s.max_q) for s in specs] == [
        ("decode", 1, 1, 1), ("decode", 2, 2, 1), ("decode", 4, 4, 1), ("prefill", 1, 64, 64), ("prefill", 2, 64, 64)]
    medusa = plan_profiles([8], 64, 64, 1)      # a 63-token draft tree per sequence: T capped at max_num_tokens
    assert [(s.kind, s.max_tokens, s.max_q) for s in medusa] == [("decode", 64, 64)]
    cfg = {"num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2}
    shapes = profile_shapes(specs[2], cfg, block_size=8, max_blocks_per_seq=32, max_num_blocks=1024)
    assert shapes["block_tables"] == ((4, 1), (4, 32), (4, 32))
    assert shapes["context_lens"] == ((4,),) * 3 and shapes["query_start"] == ((5,),) * 3
    assert shapes["input_ids"] == ((1,), (4,), (4,)) and shapes["mask"][2] == (4, 1)
    assert shapes["k_cache_1"] == ((2, 8, 2, 16), (1024, 8, 2, 16), (1024, 8, 2, 16))
    assert set(shapes) == set(step_io.input_names(2))
    prefill = profile_shapes(specs[4], cfg, block_size=8, max_blocks_per_seq=32, max_num_blocks=1024)
    assert prefill["mask"][2] == (64, 64) and prefill["block_tables"][2] == (2, 32)


def test_unrecorded_files_in_an_engine_folder_are_ignored(built, engine_copy):
    """A file the manifest does not record (here a chat template that would change every
    prompt) is never read: outputs stay those of the built engine."""
    args = ["--mode", "ar", "--max-tokens", 8, "--json", "one two three"]
    before = cli("generate", "--engine", engine_copy, *args)
    assert before.exit_code == 0, before.output
    (engine_copy / "chat_template.jinja").write_text("EVIL {{ messages[0]['content'] }} EVIL EVIL")
    cfg = json.loads((engine_copy / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg        # so the .jinja file would be the template if read
    after = cli("generate", "--engine", engine_copy, *args)
    assert after.exit_code == 0, after.output
    assert json.loads(after.output)["prompt_token_ids"] == json.loads(before.output)["prompt_token_ids"]
    # the same file in a model folder is read (the oracle that the file matters)
    from apar_rt.model.tokenizer import load_tokenizer
    assert "EVIL" in (load_tokenizer(engine_copy).chat_template or "")
    assert load_tokenizer(engine_copy, only=json.loads((engine_copy / MANIFEST_NAME).read_text())["files"]) \
        .chat_template is None


@pytest.mark.parametrize("edit,message", [
    (lambda m, d: m["onnx"].update(file="other.onnx"), "onnx.file names 'other.onnx', which the manifest does not"),
    (lambda m, d: m["files"].update({"../outside.json": m["files"]["config.json"]}), "not inside the engine folder"),
    (lambda m, d: m["files"].update({str(d.parent / "abs.json"): m["files"]["config.json"]}),
     "not inside the engine folder"),
])
def test_manifest_may_name_only_recorded_files_inside_the_folder(engine_copy, edit, message):
    shutil.copy(engine_copy / "model.onnx", engine_copy / "other.onnx")      # unrecorded
    shutil.copy(engine_copy / "config.json", engine_copy.parent / "outside.json")
    shutil.copy(engine_copy / "config.json", engine_copy.parent / "abs.json")
    path = engine_copy / MANIFEST_NAME
    m = json.loads(path.read_text())
    edit(m, engine_copy)
    path.write_text(json.dumps(m))
    with pytest.raises(EngineLoadError, match=message):
        verify_engine_dir(engine_copy)
