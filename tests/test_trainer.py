"""A few training steps of a tiny random Llama on formatted demo data (CPU, a few seconds)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from apar_rt.train import corpus, data_format  # noqa: E402
from apar_rt.train.tokenizer import train_tokenizer  # noqa: E402
from apar_rt.train.trainer import IGNORE_INDEX, TrainConfig, encode_example, train  # noqa: E402


def tiny_checkpoint(path, tokenizer, vocab_size):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    samples = corpus.generate(3, n_list=24, n_paragraph=6, n_plain=8)
    # no control tokens: the trainer must add them
    tok = train_tokenizer(corpus.tokenizer_texts(samples), vocab_size=400, control_tokens=False)
    assert "[SplitMask]" not in tok.get_vocab()
    tiny_checkpoint(d / "base", tok, len(tok))
    corpus.write_jsonl([corpus.to_record(s, i) for i, s in enumerate(samples)], d / "corpus.jsonl")
    data_format.format_file(d / "corpus.jsonl", d / "data.jsonl")
    return d, len(tok)


def test_encode_example_masks_context(workdir):
    d, _ = workdir
    tok = transformers.AutoTokenizer.from_pretrained(str(d / "base"))
    tok.add_special_tokens({"additional_special_tokens": ["[SplitMask]", "[SplitSop]"]})
    ex = next(e for e in data_format.read_examples(d / "data.jsonl") if e["kind"] == "child")
    ids, labels = encode_example(ex, tok, 1024)
    sop = tok.convert_tokens_to_ids("[SplitSop]")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    last_sop = max(i for i, t in enumerate(ids) if t == sop)
    assert all(label == IGNORE_INDEX for label in labels[: last_sop + 1])  # loss only after [SplitSop]
    assert labels[last_sop + 1 :] == ids[last_sop + 1 :]


def test_train_few_steps(workdir):
    d, base_vocab = workdir
    out = d / "out"
    res = train(TrainConfig(model=str(d / "base"), data=[str(d / "data.jsonl")], output=str(out),
                            steps=40, batch_size=8, lr=3e-3, warmup_steps=5, threads=2, progress=False,
                            log_every=5))
    assert res.rows_added == 2
    assert res.final_loss < res.first_loss * 0.8, (res.first_loss, res.final_loss)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == base_vocab + 2
    assert model.get_output_embeddings().weight.shape[0] == base_vocab + 2
    assert model.config.vocab_size == base_vocab + 2 == len(tok)
    assert tok.convert_tokens_to_ids(["[SplitMask]", "[SplitSop]"]) == [base_vocab, base_vocab + 1]
    assert (out / "model.safetensors").exists()

    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and "loss" in rows[0]
    assert rows[-1]["summary"]["steps"] == 40

    ids = tok("Hello!", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4 or gen[0, -1].item() == tok.eos_token_id


def test_train_rejects_bad_settings(workdir):
    d, _ = workdir
    with pytest.raises(ValueError, match="batch_size"):
        train(TrainConfig(model=str(d / "base"), data=[str(d / "data.jsonl")], output=str(d / "x"), batch_size=0))


def test_cli_train(workdir):
    from click.testing import CliRunner

    from apar_rt.train.commands import train_cmd

    d, base_vocab = workdir
    out = d / "cli_out"
    res = CliRunner().invoke(train_cmd, [str(d / "base"), str(d / "data.jsonl"), "-o", str(out), "--steps", "2",
                                         "--batch-size", "4", "--lr", "1e-3", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["rows_added"] == 2
    res = CliRunner().invoke(train_cmd, [str(d / "base"), str(d / "data.jsonl"), "-o", str(out), "--device", "tpu"])
    assert res.exit_code == 2 and "--device" in res.output
    res = CliRunner().invoke(train_cmd, [str(d / "base"), "-o", str(out)])
    assert res.exit_code == 2 and "DATA" in res.output
