"""Tests for the synthetic demo corpus."""

from __future__ import annotations

import json
import random

import pytest

from apar_rt.train import corpus
from apar_rt.train.data_format import FORK, format_record, pack_filter_reason, structure_answer


def test_generate_is_seeded():
    a = corpus.generate(5, n_list=30, n_paragraph=10, n_plain=8)
    b = corpus.generate(5, n_list=30, n_paragraph=10, n_plain=8)
    c = corpus.generate(6, n_list=30, n_paragraph=10, n_plain=8)
    assert a == b and a != c
    assert len(a) == 48
    kinds = [s.kind for s in a]
    assert kinds.count("list") == 30 and kinds.count("paragraph") == 10
    assert kinds.count("plain") + kinds.count("smalltalk") == 8


def test_every_shape_gets_the_intended_rule():
    rule = {"list": "ordered_list", "paragraph": "paragraph"}
    for key in corpus.all_keys():
        for r in range(2):
            answer = corpus.answer_for(key, random.Random(r))
            s, why = structure_answer(answer)
            if key[0] in rule:
                assert s is not None and s.rule == rule[key[0]], (key, why)
                assert pack_filter_reason(s.reassembled) is None
                assert len(s.streams) == key[3]
            else:
                assert s is None, key


def test_list_answer_shape():
    key = ("list", 0, 0, 4)
    assert corpus.prompt_for(key) == "Give me 4 tips for staying healthy."
    answer = corpus.answer_for(key, random.Random(0))
    lines = answer.split("\n\n")
    assert lines[0] == "Here are 4 tips for staying healthy:"
    assert [line.split(" ", 1)[0] for line in lines[1:]] == ["1.", "2.", "3.", "4."]
    s, _ = structure_answer(answer)
    # the parent writes the titles only; each child writes the two detail sentences
    assert s.main.startswith("Here are 4 tips for staying healthy:\n\n1. ")
    assert s.main.endswith(":" + FORK) and s.main.count(FORK) == 4
    for stream in s.streams:
        assert stream.startswith(" ") and stream.count(". ") == 1 and stream.endswith(".")


def test_paragraph_answer_shape():
    key = ("paragraph", 2, 0, 3)
    assert corpus.prompt_for(key) == "Write three short paragraphs about sleeping better."
    s, _ = structure_answer(corpus.answer_for(key, random.Random(1)))
    parts = s.main.split("\n\n")
    assert parts[0] == "Here are some thoughts on sleeping better."
    assert [p.split(",")[0] for p in parts[1:]] == ["First", "Second", "Third"]
    assert all(p.endswith(". " + FORK) for p in parts[1:])


def test_vicuna_template_in_examples():
    s = corpus.generate(0, n_list=1, n_paragraph=0, n_plain=0)[0]
    ex = format_record(corpus.to_record(s, 0))[0]
    assert ex["segments"][0]["text"] == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: " + s.prompt + " ASSISTANT:"
    )
    assert ex["segments"][1]["text"].startswith(" Here are ")


def test_heldout_split():
    held = corpus.heldout_keys(0)
    assert held == corpus.heldout_keys(0) and held != corpus.heldout_keys(1)
    kinds = [k[0] for k in held]
    assert kinds.count("list") == 24 and kinds.count("paragraph") == 12 and kinds.count("plain") == 8
    assert len(set(held)) == len(held)
    train = corpus.generate(0, n_list=400, n_paragraph=100, n_plain=80, exclude=set(held))
    train_prompts = {s.prompt for s in train}
    rows = corpus.heldout_records(0)
    assert len(rows) == 44
    assert sum(r["structured"] for r in rows) == 36
    for r in rows:
        assert r["prompt"] not in train_prompts
        s, _ = structure_answer(r["reference"])
        assert (s is not None) == r["structured"]
    # every held-out topic is still trained through other prompts
    assert {k[1] for k in held if k[0] == "list"} <= {s.key[1] for s in train if s.kind == "list"}


def test_records_and_jsonl(tmp_path):
    samples = corpus.generate(1, n_list=3, n_paragraph=1, n_plain=4)
    rows = [corpus.to_record(s, i) for i, s in enumerate(samples)]
    assert rows[0]["id"] == "demo-00000"
    assert [m["from"] for m in rows[0]["conversations"]] == ["human", "gpt"]
    p = tmp_path / "c.jsonl"
    corpus.write_jsonl(rows, p)
    assert [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] == rows


def test_generate_errors():
    with pytest.raises(ValueError, match="n_list"):
        corpus.generate(0, n_list=-1)
    every_list = {k for k in corpus.all_keys() if k[0] == "list"}
    with pytest.raises(ValueError, match="no list prompt keys"):
        corpus.generate(0, n_list=1, exclude=every_list)


def test_cli_corpus(tmp_path):
    from click.testing import CliRunner

    from apar_rt.train.commands import corpus_cmd

    out, held = tmp_path / "c.jsonl", tmp_path / "h.jsonl"
    args = [str(out), "--seed", "2", "--n-list", "5", "--n-paragraph", "2", "--n-plain", "4", "--heldout", str(held)]
    res = CliRunner().invoke(corpus_cmd, args)
    assert res.exit_code == 0, res.output
    assert len(out.read_text(encoding="utf-8").splitlines()) == 11
    assert len(held.read_text(encoding="utf-8").splitlines()) == 44
    res = CliRunner().invoke(corpus_cmd, [str(out), "--n-list", "-3"])
    assert res.exit_code == 2 and "--n-list" in res.output
