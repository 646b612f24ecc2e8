"""Tests for apar_rt.train.data_format.

Every expected string here was written by hand from the reference rules in
THUDM/APAR data/filter_structured.py and data/as_apar_format.py.
"""

from __future__ import annotations

import json
import re

import pytest

from apar_rt.train import data_format as df
from apar_rt.train.data_format import (
    Rejected,
    format_file,
    format_record,
    pack_filter_reason,
    split_ordered_list,
    split_paragraphs,
    structure_answer,
)

PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: Give me 3 tips. ASSISTANT:"
)

LIST_ANSWER = "Tips:\n1. Eat: Eat more greens.\n2. Sleep: Sleep eight hours.\n3. Move: Walk every day."


# --- ordered-list rule -----------------------------------------------------------


def test_list_rule_single_newlines():
    s = split_ordered_list(LIST_ANSWER)
    assert s.rule == "ordered_list"
    assert s.main == "Tips:\n1. Eat:[SplitMask]\n\n2. Sleep:[SplitMask]\n\n3. Move:[SplitMask]"
    # details keep the space after the colon; only newlines are stripped
    assert s.streams == (" Eat more greens.", " Sleep eight hours.", " Walk every day.")
    # separators become blank lines; the last item keeps the appended "\n\n" plus one "\n"
    assert s.reassembled == (
        "Tips:\n1. Eat: Eat more greens.\n\n2. Sleep: Sleep eight hours.\n\n3. Move: Walk every day.\n\n\n"
    )


def test_list_rule_blank_lines_and_epilogue():
    answer = (
        "Here you go:\n\n1. Plan: Write down your goals.\n\n2. Track: Check progress weekly.\n\n"
        "3. Rest: Take one day off.\n\nGood luck!"
    )
    s = split_ordered_list(answer)
    assert s.main == (
        "Here you go:\n\n1. Plan:[SplitMask]\n\n2. Track:[SplitMask]\n\n3. Rest:[SplitMask]\n\n\nGood luck!"
    )
    assert s.streams == (" Write down your goals.", " Check progress weekly.", " Take one day off.")
    assert s.reassembled == (
        "Here you go:\n\n1. Plan: Write down your goals.\n\n2. Track: Check progress weekly.\n\n"
        "3. Rest: Take one day off.\n\n\nGood luck!\n\n"
    )


def test_list_rule_fullwidth_colon():
    s = split_ordered_list("1. A：alpha alpha one.\n2. B：beta beta two.\n3. C：gamma gamma three.")
    assert s.main == "1. A：[SplitMask]\n\n2. B：[SplitMask]\n\n3. C：[SplitMask]"
    assert s.streams == ("alpha alpha one.", "beta beta two.", "gamma gamma three.")


def test_child_targets():
    s = split_ordered_list(LIST_ANSWER)
    assert s.child_targets() == [
        "Tips:\n1. Eat:[SplitMask][SplitSop] Eat more greens.",
        "Tips:\n1. Eat:[SplitMask]\n\n2. Sleep:[SplitMask][SplitSop] Sleep eight hours.",
        "Tips:\n1. Eat:[SplitMask]\n\n2. Sleep:[SplitMask]\n\n3. Move:[SplitMask][SplitSop] Walk every day.",
    ]


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("No list here, just words.", "no_list_items"),
        ("1. A: first detail here.\n2. B: second detail here.", "too_few_items"),
        ("1. A: short.\n2. B: a long enough detail.\n3. C: another long detail.", "short_item_detail"),
        # the intro holds item 1's detail text, so replace() puts a 4th fork there
        (
            "Note: be very calm.\n1. A: be very calm.\n2. B: rest a lot today.\n3. C: walk a lot today.",
            "fork_count_mismatch",
        ),
        (
            "1. Eat: eat good food daily.\n2. Rest: sleep well at night.\n3. Plan: do these things\n"
            " 1. read a book\n 2. go to bed early",
            "nested_list",
        ),
        ("1. A: aaa aaa aaa.\n2. B: bbb bbb bbb.\n3. C:", "no_last_item"),
    ],
)
def test_list_rule_rejections(answer, reason):
    with pytest.raises(Rejected) as e:
        split_ordered_list(answer)
    assert e.value.reason == reason


def test_list_rule_last_item_ambiguous(monkeypatch):
    # With the reference's patterns a second last-item match in the tail seems not to
    # occur in real text (a random search found none): any later "N. x:" is an inner
    # item. The check is kept for fidelity; force the path with a looser pattern.
    monkeypatch.setattr(df, "_LIST_LAST", re.compile(r"(\d+\.)\s+(\w+)\s+(\w+)\n"))
    with pytest.raises(Rejected) as e:
        split_ordered_list("1. A: aaa aaa aaa.\n2. B: bbb bbb bbb.\n3. C: ccc ccc ccc.\n4. D x\n5. F y\n")
    assert e.value.reason == "last_item_ambiguous"


# --- paragraph rule ----------------------------------------------------------------

PARA_ANSWER = (
    "Here is a short guide to health.\n\n"
    "Sleep matters a lot. It helps you heal. It helps you think.\n\n"
    "Food matters too. Eat many greens. Drink water.\n\n"
    "Exercise keeps you fit. Walk each day. Stretch often.\n"
)


def test_paragraph_rule():
    s = split_paragraphs(PARA_ANSWER)
    assert s.rule == "paragraph"
    assert s.main == (
        "Here is a short guide to health.\n\n"
        "Sleep matters a lot. [SplitMask]\n\n"
        "Food matters too. [SplitMask]\n\n"
        "Exercise keeps you fit. [SplitMask]"
    )
    assert s.streams == (
        "It helps you heal. It helps you think.",
        "Eat many greens. Drink water.",
        "Walk each day. Stretch often.",
    )
    assert s.reassembled == PARA_ANSWER  # the original, untouched


def test_paragraph_rule_chinese_separator():
    answer = "第一段的主要内容在这里写着。细节一。\n\n第二段的主要内容在这里写着。细节二。\n\n第三段的主要内容在这里写着。细节三。"
    s = split_paragraphs(answer)
    assert s.main == (
        "第一段的主要内容在这里写着。[SplitMask]\n\n第二段的主要内容在这里写着。[SplitMask]\n\n"
        "第三段的主要内容在这里写着。[SplitMask]"
    )
    assert s.streams == ("细节一。", "细节二。", "细节三。")


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("One para. With two sentences.\n\nSecond para. Also two sentences.", "too_few_paragraphs"),
        ("One para. With two.\n\n   \n\nSecond. Two.", "too_few_paragraphs"),
        (
            "Hi. There is more here.\n\nA longer first sentence. More.\n\nAnother long first one. More.",
            "short_paragraph",
        ),
        (
            "We met Mr.Brown at the gym today. He was kind.\n\nA longer first sentence. More.\n\n"
            "Another long first one. More.",
            "honorific",
        ),
        (
            "This is the first paragraph.\n\nThis is the second paragraph.\n\nThis is the third paragraph.",
            "no_stream",
        ),
        (
            "First topic goes here. More detail.\n\nSecond topic goes here. More detail.\n\n"
            "A single sentence paragraph.",
            "too_few_forks",
        ),
    ],
)
def test_paragraph_rule_rejections(answer, reason):
    with pytest.raises(Rejected) as e:
        split_paragraphs(answer)
    assert e.value.reason == reason


def test_structure_answer_falls_back_and_reports_both_reasons():
    s, why = structure_answer(PARA_ANSWER)
    assert s is not None and why == "paragraph"
    s, why = structure_answer("Just one line.")
    assert s is None and why == "no_list_items+too_few_paragraphs"
    # a two-item list fails the list rule and then the paragraph rule ("1. [SplitMask]" < 20)
    s, why = structure_answer("Try these:\n\n1. Eat: Eat more greens. They help.\n\n2. Sleep: Sleep well. It helps.")
    assert s is None and why == "too_few_items+short_paragraph"


# --- pack filters ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        ("plain words", None),
        ("x = 1", "contains '='"),
        ("a -> b", "contains '>'"),
        ("see http://x", "contains 'http'"),
        ("```code```", "contains '```'"),
        ("$$x$$", "contains '$$'"),
        ("a --- b", "contains '---'"),
        ("a < b", "contains '<'"),
        ("中文", "cjk"),
        ("ひらがな", "cjk"),
        ("한국어", "cjk"),
    ],
)
def test_pack_filter(text, reason):
    assert pack_filter_reason(text) == reason


# --- examples and files ------------------------------------------------------------


def rec(answer, rid="r1", prompt="Give me 3 tips."):
    return {"id": rid, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def test_format_record_main_and_children():
    out = format_record(rec(LIST_ANSWER))
    assert [e["id"] for e in out] == ["r1_main", "r1_0", "r1_1", "r1_2"]
    assert out[0] == {
        "id": "r1_main",
        "source_id": "r1",
        "kind": "main",
        "rule": "ordered_list",
        "child_index": None,
        "segments": [
            {"text": PROMPT, "loss": False},
            {
                "text": " Tips:\n1. Eat:[SplitMask]\n\n2. Sleep:[SplitMask]\n\n3. Move:[SplitMask]</s>",
                "loss": True,
            },
        ],
    }
    assert out[2] == {
        "id": "r1_1",
        "source_id": "r1",
        "kind": "child",
        "rule": "ordered_list",
        "child_index": 1,
        "segments": [
            {"text": PROMPT, "loss": False},
            {"text": " Tips:\n1. Eat:[SplitMask]\n\n2. Sleep:[SplitMask][SplitSop]", "loss": False},
            {"text": " Sleep eight hours.</s>", "loss": True},
        ],
    }


def test_format_record_plain_and_filtered():
    out = format_record(rec("Just one line.", rid=None), index=7)
    assert out == [
        {
            "id": "row7",
            "source_id": "row7",
            "kind": "plain",
            "rule": None,
            "child_index": None,
            "segments": [{"text": PROMPT, "loss": False}, {"text": " Just one line.</s>", "loss": True}],
        }
    ]
    assert format_record(rec("Just one line."), plain=False) == []
    eq = LIST_ANSWER.replace("Walk every day.", "Walk = good.")
    assert format_record(rec(eq)) == []
    kept = format_record(rec(eq), filtered_as_plain=True)
    assert [e["kind"] for e in kept] == ["plain"]
    assert kept[0]["segments"][1]["text"] == " " + eq + "</s>"


def test_format_record_turns():
    r = {
        "id": "m",
        "conversations": [
            {"from": "gpt", "value": "ignored greeting"},
            {"from": "human", "value": "Give me 3 tips."},
            {"from": "gpt", "value": "Just one line."},
            {"from": "human", "value": "second turn is ignored"},
            {"from": "gpt", "value": LIST_ANSWER},
        ],
    }
    out = format_record(r)
    assert [e["kind"] for e in out] == ["plain"]
    assert format_record({"id": "x", "conversations": [{"from": "human", "value": "only a question"}]}) == []


def test_format_file_jsonl_and_json_are_deterministic(tmp_path):
    records = [rec(LIST_ANSWER, "a"), rec(PARA_ANSWER, "b"), rec("Just one line.", "c")]
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    js = tmp_path / "in.json"
    js.write_text(json.dumps(records, indent=2), encoding="utf-8")
    o1, o2, o3 = tmp_path / "o1.jsonl", tmp_path / "o2.jsonl", tmp_path / "o3.jsonl"
    st = format_file(jl, o1)
    format_file(jl, o2)
    format_file(js, o3)
    assert o1.read_bytes() == o2.read_bytes() == o3.read_bytes()
    lines = o1.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 3 + 1 + 3 + 1
    assert st.as_dict() == {
        "records": 3,
        "examples": {"main": 2, "child": 6, "plain": 1, "flat": 0},
        "structured": {"ordered_list": 1, "paragraph": 1},
        "not_structured": {"no_list_items+too_few_paragraphs": 1},
    }
    assert df.read_examples(o1)[3]["id"] == "a_2"


def test_read_records_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        df.read_records(p)


# --- CLI ---------------------------------------------------------------------------


def test_cli_data_format(tmp_path):
    from click.testing import CliRunner

    from apar_rt.train.commands import data

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(rec(LIST_ANSWER, "a")) + "\n", encoding="utf-8")
    res = CliRunner().invoke(data, ["format", str(src), str(tmp_path / "out.jsonl")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["examples"] == {"main": 1, "child": 3, "plain": 0, "flat": 0}
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 4

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    res = CliRunner().invoke(data, ["format", str(bad), str(tmp_path / "o2.jsonl")])
    assert res.exit_code == 2 and "INPUT" in res.output and "bad.jsonl:1" in res.output
    res = CliRunner().invoke(data, ["format", str(tmp_path / "missing.jsonl"), str(tmp_path / "o3.jsonl")])
    assert res.exit_code == 2 and "INPUT" in res.output
    res = CliRunner().invoke(data, ["format", "--help"])
    assert res.exit_code == 0 and "ShareGPT" in res.output


def test_flat_fraction_keeps_some_structured_answers_whole():
    """flat_fraction=1 adds the untouched answer as a 'flat' example; 0 adds none; plain answers unchanged."""
    exs = format_record(rec(LIST_ANSWER, rid="r7"), flat_fraction=1.0)
    flat = [e for e in exs if e["kind"] == "flat"]
    assert [e["id"] for e in exs] == ["r7_main", "r7_0", "r7_1", "r7_2", "r7_flat"]
    assert flat[0]["segments"] == [
        {"text": PROMPT, "loss": False},
        {"text": " Tips:\n1. Eat: Eat more greens.\n2. Sleep: Sleep eight hours.\n3. Move: Walk every day.</s>",
         "loss": True}]
    assert [e["kind"] for e in format_record(rec(LIST_ANSWER, rid="r7"), flat_fraction=0.0)] == \
        ["main", "child", "child", "child"]
    # the choice is by id, so a fraction keeps a stable subset
    ids = [f"q{i}" for i in range(400)]
    kept = {i for i in ids if any(e["kind"] == "flat" for e in format_record(rec(LIST_ANSWER, rid=i),
                                                                              flat_fraction=0.3))}
    again = {i for i in ids if any(e["kind"] == "flat" for e in format_record(rec(LIST_ANSWER, rid=i),
                                                                               flat_fraction=0.3))}
    assert kept == again and 80 < len(kept) < 160
