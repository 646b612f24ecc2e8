"""`apar-rt bench widen`: the widened checkpoint computes what its source does (transformers is the
oracle), with dense new weights, and bad sizes or folders get errors that name the flag."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from apar_rt.bench.widen import widen_checkpoint, widened_config


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("fixture,factor,extra_layers", [("tiny_gqa", 4, 2), ("tiny_mha", 2, 1)])
def test_widened_model_has_the_sources_logits_and_greedy_tokens(request, tmp_path, fixture, factor, extra_layers):
    path, _, tok = request.getfixturevalue(fixture)   # GQA, and MHA with tied embeddings
    src = _config(path)
    out = tmp_path / "wide"
    summary = widen_checkpoint(path, out, src["hidden_size"] * factor, src["num_hidden_layers"] + extra_layers)
    new = _config(out)
    assert (new["hidden_size"], new["intermediate_size"], new["num_attention_heads"], new["num_key_value_heads"],
            new["num_hidden_layers"]) == (src["hidden_size"] * factor, src["intermediate_size"] * factor,
                                          src["num_attention_heads"] * factor, src["num_key_value_heads"] * factor,
                                          src["num_hidden_layers"] + extra_layers)
    assert new["rms_norm_eps"] == pytest.approx(src["rms_norm_eps"] / factor)
    assert "tokenizer.json" in summary["copied"] and (out / "tokenizer.json").is_file()

    a, b = _model(path), _model(out)
    ids = torch.randint(3, len(tok), (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
        ga = a.generate(ids[:1, :8], max_new_tokens=24, do_sample=False)
        gb = b.generate(ids[:1, :8], max_new_tokens=24, do_sample=False)
    assert ga.tolist() == gb.tolist()

    # the new weights that never reach the output are dense (random), so they cost what real ones do
    h = src["hidden_size"]
    q = b.model.layers[0].self_attn.q_proj.weight
    assert q[a.model.layers[0].self_attn.q_proj.weight.shape[0]:].abs().min() > 0
    assert q[:, h:].abs().min() > 0
    deep = b.model.layers[-1]
    assert deep.mlp.gate_proj.weight.abs().min() > 0 and deep.self_attn.k_proj.weight.abs().min() > 0
    assert not deep.self_attn.o_proj.weight.any() and not deep.mlp.down_proj.weight.any()


def test_bad_sizes_and_outputs_are_refused_naming_the_flag(tiny_gqa, tmp_path):
    path, _, _ = tiny_gqa
    src = _config(path)
    h, layers = src["hidden_size"], src["num_hidden_layers"]
    with pytest.raises(ValueError, match=f"--hidden-size {h + 1} must be a multiple of the model's hidden size {h}"):
        widen_checkpoint(path, tmp_path / "a", h + 1)
    with pytest.raises(ValueError, match=f"--num-layers {layers - 1} must be at least the model's {layers}"):
        widen_checkpoint(path, tmp_path / "b", 2 * h, layers - 1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="--output .* exists and is not an empty folder"):
        widen_checkpoint(path, tmp_path / "full", 2 * h)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="without attention or MLP biases"):
        widened_config(dict(src, attention_bias=True), 2 * h, layers)

    from apar_rt.cli import main

    r = CliRunner().invoke(main, ["bench", "widen", "--model", str(path), "--output", str(tmp_path / "c"),
                                  "--hidden-size", str(h + 1)])
    assert r.exit_code == 2 and "--hidden-size" in r.output and "multiple" in r.output
    r = CliRunner().invoke(main, ["bench", "widen", "--model", str(path), "--output", str(tmp_path / "d"),
                                  "--hidden-size", str(2 * h)])
    assert r.exit_code == 0, r.output
    assert f"hidden size {2 * h} (2x), {layers} layers" in r.output
    assert _config(tmp_path / "d")["hidden_size"] == 2 * h


def test_medusa_heads_are_widened_with_the_same_logits(tiny_gqa, tmp_path):
    import shutil

    from apar_rt.medusa.heads import MedusaHeads, load_heads

    path, hf, tok = tiny_gqa
    src = tmp_path / "src"
    shutil.copytree(path, src)
    heads = MedusaHeads.init_from_lm_head(hf.lm_head.weight.detach(), num_heads=3, num_layers=2)
    with torch.no_grad():   # ResBlocks away from the identity they start at
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    heads.save(src / "medusa")
    h = _config(src)["hidden_size"]
    summary = widen_checkpoint(src, tmp_path / "wide", 4 * h, _config(src)["num_hidden_layers"] + 1)
    assert "medusa" in summary["copied"]

    a, b = _model(src), _model(tmp_path / "wide")
    ha = load_heads(src / "medusa", hidden=h, vocab=hf.config.vocab_size)
    hb = load_heads(tmp_path / "wide" / "medusa", hidden=4 * h, vocab=hf.config.vocab_size)
    ids = torch.randint(3, len(tok), (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        xa = a(ids, output_hidden_states=True).hidden_states[-1]   # the final norm's output
        xb = b(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(hb(xb[0]), ha(xa[0]), rtol=1e-5, atol=1e-5)
    assert not xb[..., h:].any()   # the new dimensions of the stream stay 0


def test_widened_demo_forks_the_same_trees_in_apar_rt(tmp_path):
    """The shipped demo widened 2x with one more layer: apar-rt's APAR answers to held-out prompts
    (greedy, forks included) are the demo's, text for text and branch for branch."""
    from pathlib import Path

    from apar_rt import LLM, SamplingParams

    root = Path(__file__).resolve().parent.parent
    demo = root / "samples/models/apar-tiny"
    prompts = [json.loads(line)["prompt"] for line in (root / "samples/prompts/heldout.jsonl").read_text().splitlines()
               if json.loads(line)["structured"]][:4]
    widen_checkpoint(demo, tmp_path / "wide", 2 * _config(demo)["hidden_size"], _config(demo)["num_hidden_layers"] + 1)
    params = SamplingParams(max_tokens=160)
    answers = []
    for path in (demo, tmp_path / "wide"):
        outs = LLM(str(path), dtype="float32", device="cpu").generate(prompts, params)
        answers.append([(o.text, [b["token_ids"] for b in o.branches]) for o in outs])
    assert answers[0] == answers[1]
    assert sum(len(branches) - 1 for _, branches in answers[0]) >= 4, "the prompts were meant to fork"
