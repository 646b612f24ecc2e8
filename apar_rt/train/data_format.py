"""Turn ShareGPT-style conversations into APAR training examples.

The rules follow THUDM/APAR ``data/filter_structured.py`` (which answers are
structured and where the forks go) and ``data/as_apar_format.py`` (which
structured answers are kept, and how they become training examples).

Input
-----
A JSON array, or JSONL with one object per line::

    {"id": "abc", "conversations": [{"from": "human", "value": "..."},
                                    {"from": "gpt", "value": "..."}, ...]}

Only the first (human, gpt) turn is used, as in the reference (``dialog[:1]``).
Leading non-human messages are skipped; ``"user"`` and ``"assistant"`` are accepted
as aliases of ``"human"`` and ``"gpt"``. A record without an id gets ``row<N>``.

Which answers fork
------------------
1. **Ordered-list rule.** ``"\\n\\n"`` is appended to the answer. Every
   ``N. summary: detail`` that is followed by another ``M. ...:`` is an item
   (``_LIST_ITEM``); its detail becomes a child stream (``detail.rstrip("\\n")``) and
   every occurrence of that detail text in the answer is replaced by
   ``"[SplitMask]\\n"``. The last item is searched for after the last fork
   (``_LIST_LAST``: ``N. summary: detail`` up to the next blank line).
   Rejected when: no item matches; the last item is not found exactly once; fewer
   than 3 streams; a stream is shorter than 10 characters; the number of
   ``[SplitMask]`` in the answer differs from the number of streams (a detail text
   occurred more than once); a stream holds a nested numbered line
   (``"\\n\\s*\\d+\\.\\s+"``). Then every ``"[SplitMask]\\n"`` not followed by another
   newline gets a second ``"\\n"``, and the main text is right-stripped.
2. **Paragraph rule** (tried when the list rule rejects). The stripped answer is
   split on ``"\\n\\n"`` (blank pieces dropped). With ``"。"`` anywhere the sentence
   separator is ``"。"``, otherwise ``". "``. A paragraph of one sentence is kept
   as is; otherwise it becomes ``first + sep + "[SplitMask]"`` and the rest of its
   sentences (stripped) become a stream. Rejected when: at most 2 paragraphs; a
   processed paragraph is shorter than 20 characters (the ``[SplitMask]`` text
   counts); the main text contains ``"mr."``, ``"mrs."`` or ``"dr."`` (any case);
   no stream; fewer than 3 ``[SplitMask]``.
3. Otherwise the answer is **unstructured**.

A structured answer is dropped (as in ``as_apar_format.pack_data``) when its
reassembled text holds CJK/Hiragana/Hangul characters, or any of
`````` ``` ``````, ``$$``, ``>``, ``<``, ``=``, ``---``, ``http``. With
``filtered_as_plain`` it is kept as a plain example instead.

Output (JSONL, one example per line, keys in this order)
---------------------------------------------------------
::

    {"id": "abc_main", "source_id": "abc", "kind": "main", "rule": "ordered_list",
     "child_index": null,
     "segments": [{"text": "<vicuna prompt>", "loss": false},
                  {"text": " Intro:\\n1. A:[SplitMask]\\n\\n2. B:[SplitMask]...</s>", "loss": true}]}

- ``kind``: ``"main"`` (the answer with its ``[SplitMask]`` tokens), ``"child"`` (one
  per stream) or ``"plain"`` (an unstructured answer, unchanged).
- ``rule``: ``"ordered_list"``, ``"paragraph"`` or ``null`` for plain examples.
- ``child_index``: the stream's index (0-based) for children, else ``null``.
- ``segments``: the full training text is the concatenation of the segment texts.
  Tokens of a segment with ``"loss": true`` are prediction targets, the others are
  context only. The first segment is always the Vicuna v1.1 prompt (ends with
  ``"ASSISTANT:"``); the answer follows after one space and ends with ``"</s>"``.
  A child has three segments: the prompt; ``" " + main text up to and including its
  [SplitMask] + "[SplitSop]"`` (no loss, so the loss starts after the last
  ``[SplitSop]``, as in the reference's ``preprocess``); and ``stream + "</s>"``.

With ``flat_fraction`` f > 0, a structured answer whose id falls in the fraction f
(by CRC-32 of the id, so the choice is deterministic) also yields its original text as
a ``"flat"`` example (kind ``"flat"``, id ``<id>_flat``), so the model can still write
the whole answer when [SplitMask] is banned (AR mode, the baseline).

Ids: ``<id>_main``, ``<id>_<k>`` for child k, ``<id>`` for plain. Consumers
tokenize each segment with ``add_special_tokens=False``, concatenate, and prepend
BOS. Output order follows input order and the JSON is written with fixed keys and
``ensure_ascii=False``, so the same input gives byte-identical output.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from apar_rt.model.tokenizer import vicuna_v1_1_prompt as vicuna_prompt

FORK = "[SplitMask]"
CHILD = "[SplitSop]"
EOS_TEXT = "</s>"  # the Vicuna v1.1 end of an assistant turn (FastChat sep2)

# --- ordered-list rule (same patterns as the reference) ---------------------------
# An item followed by another "N. ...:" item; groups: index, summary, detail.
_LIST_ITEM = re.compile(r"\s*(\d+\.)\s+([\s\S]+?)[:：]([\s\S]+?)(?=(?:\d+\.)\s+[\s\S]+?[:：])")
# The last item: its detail runs to the first blank line.
_LIST_LAST = re.compile(r"\s*(\d+\.)\s+([\s\S]+?)[:：]([\s\S]+?)\n\n")
# A numbered line inside a detail (a nested list): rejected.
_NESTED_NUMBER = re.compile(r"\n\s*\d+\.\s+")
# A fork followed by a single newline; the reference makes it a blank line.
_FORK_SINGLE_NEWLINE = re.compile(rf"({re.escape(FORK)}\n)(?!\n)")

MIN_LIST_STREAMS = 3
MIN_LIST_STREAM_CHARS = 10
MIN_PARAGRAPHS = 3
MIN_PARAGRAPH_CHARS = 20
MIN_PARAGRAPH_FORKS = 3
_HONORIFICS = ("mr.", "mrs.", "dr.")

# --- pack filters (as_apar_format.py) ----------------------------------------------
_CONFUSING = ("```", "$$", ">", "<", "=", "---", "http")

_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant"}


class Rejected(ValueError):
    """A rule does not apply to an answer; ``reason`` is a short stable tag."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Structured:
    """An answer split for APAR.

    Attributes:
        rule: ``"ordered_list"`` or ``"paragraph"``.
        main: the answer with ``[SplitMask]`` at each fork, right-stripped.
        streams: the child texts, one per ``[SplitMask]`` in ``main``, in order.
        reassembled: the answer as the tree reads back (the reference's
            ``reassembled_response``).
    """

    rule: str
    main: str
    streams: tuple[str, ...]
    reassembled: str

    def child_targets(self) -> list[str]:
        """Answer-side text of each child example: main up to its fork, [Child], stream."""
        parts = self.main.split(FORK)
        return [FORK.join(parts[: i + 1]) + FORK + CHILD + s for i, s in enumerate(self.streams)]


def split_ordered_list(response: str) -> Structured:
    """Apply the ordered-list rule.

    Raises:
        Rejected: with reason ``no_list_items``, ``no_last_item``,
            ``last_item_ambiguous``, ``too_few_items``, ``short_item_detail``,
            ``fork_count_mismatch`` or ``nested_list``.
    """
    text = response + "\n\n"
    streams: list[str] = []

    def take(detail: str) -> None:
        nonlocal text
        streams.append(detail.rstrip("\n"))
        text = text.replace(detail, FORK + "\n")

    inner = _LIST_ITEM.findall(text)
    if not inner:
        raise Rejected("no_list_items")
    for _index, _summary, detail in inner:
        take(detail)
    # The reference searches from one character past the start of the last fork.
    tail = text[text.rfind(FORK) + 1 :]
    last = _LIST_LAST.findall(tail)
    if last:
        take(last[0][2])
    if not last:
        raise Rejected("no_last_item")
    if len(last) != 1:
        raise Rejected("last_item_ambiguous")
    if len(streams) < MIN_LIST_STREAMS:
        raise Rejected("too_few_items")
    if any(len(s) < MIN_LIST_STREAM_CHARS for s in streams):
        raise Rejected("short_item_detail")
    if text.count(FORK) != len(streams):
        raise Rejected("fork_count_mismatch")
    if any(_NESTED_NUMBER.search(s) for s in streams):
        raise Rejected("nested_list")

    text = _FORK_SINGLE_NEWLINE.sub(FORK + "\n\n", text)
    parts = text.split(FORK)
    reassembled = parts[0] + "".join(s + p for s, p in zip(streams, parts[1:]))
    return Structured("ordered_list", text.rstrip(), tuple(streams), reassembled)


def split_paragraphs(response: str) -> Structured:
    """Apply the paragraph rule.

    Raises:
        Rejected: with reason ``too_few_paragraphs``, ``short_paragraph``,
            ``honorific``, ``no_stream`` or ``too_few_forks``.
    """
    stripped = response.strip()
    paragraphs = [p for p in stripped.split("\n\n") if p.strip()]
    if len(paragraphs) < MIN_PARAGRAPHS:
        raise Rejected("too_few_paragraphs")
    sep = "。" if "。" in stripped else ". "
    processed: list[str] = []
    streams: list[str] = []
    for p in paragraphs:
        sentences = p.strip().split(sep)
        if len(sentences) <= 1:
            processed.append(p)
            continue
        processed.append(sentences[0] + sep + FORK)
        streams.append(sep.join(sentences[1:]).strip())
    if any(len(p) < MIN_PARAGRAPH_CHARS for p in processed):
        raise Rejected("short_paragraph")
    main = "\n\n".join(processed)
    lowered = main.lower()
    if any(h in lowered for h in _HONORIFICS):
        raise Rejected("honorific")
    if not streams:
        raise Rejected("no_stream")
    if main.count(FORK) < MIN_PARAGRAPH_FORKS:
        raise Rejected("too_few_forks")
    return Structured("paragraph", main.rstrip(), tuple(streams), response)


def structure_answer(response: str) -> tuple[Structured | None, str]:
    """Try the list rule, then the paragraph rule.

    Returns:
        ``(structured, "ordered_list" | "paragraph")`` or ``(None, reason)`` where
        ``reason`` is ``"<list reason>+<paragraph reason>"``.
    """
    try:
        s = split_ordered_list(response)
        return s, s.rule
    except Rejected as e:  # the reference falls back on any error
        list_reason = e.reason
    try:
        s = split_paragraphs(response)
        return s, s.rule
    except Rejected as e:
        return None, f"{list_reason}+{e.reason}"


def _has_cjk(text: str) -> bool:
    return any(
        "\u4e00" <= c <= "\u9fff" or "\u3040" <= c <= "\u309f" or "\uac00" <= c <= "\ud7a3" for c in text
    )


def pack_filter_reason(reassembled: str) -> str | None:
    """Why ``as_apar_format.pack_data`` would drop a structured answer, or None."""
    if _has_cjk(reassembled):
        return "cjk"
    for pattern in _CONFUSING:
        if pattern in reassembled:
            return f"contains {pattern!r}"
    return None


@dataclass
class FormatStats:
    """Counts of what happened to each input record."""

    records: int = 0
    main: int = 0
    child: int = 0
    plain: int = 0
    flat: int = 0
    by_rule: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "examples": {"main": self.main, "child": self.child, "plain": self.plain, "flat": self.flat},
            "structured": dict(sorted(self.by_rule.items())),
            "not_structured": dict(sorted(self.rejected.items())),
        }


def _example(
    eid: str, source_id: str, kind: str, rule: str | None, child_index: int | None, segments: list
) -> dict[str, Any]:
    return {
        "id": eid,
        "source_id": source_id,
        "kind": kind,
        "rule": rule,
        "child_index": child_index,
        "segments": [{"text": t, "loss": loss} for t, loss in segments],
    }


def first_turn(record: dict[str, Any]) -> tuple[str, str] | None:
    """The first (human, gpt) pair of a ShareGPT record, or None."""
    conv = record.get("conversations")
    if not isinstance(conv, list):
        return None
    msgs = [m for m in conv if isinstance(m, dict)]
    while msgs and str(msgs[0].get("from", "")).lower() not in _HUMAN:
        msgs = msgs[1:]
    if len(msgs) < 2 or str(msgs[1].get("from", "")).lower() not in _GPT:
        return None
    prompt, answer = msgs[0].get("value"), msgs[1].get("value")
    if not isinstance(prompt, str) or not isinstance(answer, str):
        return None
    return prompt, answer


def format_record(
    record: dict[str, Any],
    index: int = 0,
    *,
    plain: bool = True,
    filtered_as_plain: bool = False,
    flat_fraction: float = 0.0,
    stats: FormatStats | None = None,
) -> list[dict[str, Any]]:
    """Format one ShareGPT record into zero or more training examples (see module doc)."""
    st = stats if stats is not None else FormatStats()
    st.records += 1
    rid = record.get("id")
    source_id = str(rid) if rid is not None else f"row{index}"
    turn = first_turn(record)
    if turn is None:
        st.rejected["no_turn"] += 1
        return []
    prompt_text, answer = turn
    prompt = vicuna_prompt(prompt_text)
    structured, why = structure_answer(answer)
    if structured is not None:
        dropped = pack_filter_reason(structured.reassembled)
        if dropped is None:
            st.by_rule[structured.rule] += 1
            out = [
                _example(
                    f"{source_id}_main",
                    source_id,
                    "main",
                    structured.rule,
                    None,
                    [(prompt, False), (" " + structured.main + EOS_TEXT, True)],
                )
            ]
            parts = structured.main.split(FORK)
            for k, stream in enumerate(structured.streams):
                context = " " + FORK.join(parts[: k + 1]) + FORK + CHILD
                out.append(
                    _example(
                        f"{source_id}_{k}",
                        source_id,
                        "child",
                        structured.rule,
                        k,
                        [(prompt, False), (context, False), (stream + EOS_TEXT, True)],
                    )
                )
            st.main += 1
            st.child += len(structured.streams)
            if flat_fraction > 0 and zlib.crc32(source_id.encode()) % 10000 < flat_fraction * 10000:
                st.flat += 1
                out.append(_example(f"{source_id}_flat", source_id, "flat", structured.rule, None,
                                    [(prompt, False), (" " + answer + EOS_TEXT, True)]))
            return out
        why = f"filtered {dropped}"
        if not filtered_as_plain:
            st.rejected[why] += 1
            return []
    st.rejected[why] += 1
    if not plain:
        return []
    st.plain += 1
    return [_example(source_id, source_id, "plain", None, None, [(prompt, False), (" " + answer + EOS_TEXT, True)])]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON array or JSONL file of ShareGPT records.

    Raises:
        ValueError: the file is neither, naming the line that failed.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from e
        if not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{p}: the JSON array must hold objects")
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{n}: each line must be a JSON object")
        out.append(rec)
    return out


def format_records(
    records: Iterable[dict[str, Any]], *, plain: bool = True, filtered_as_plain: bool = False,
    flat_fraction: float = 0.0, stats: FormatStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Format records in order (see `format_record`)."""
    for i, rec in enumerate(records):
        yield from format_record(rec, i, plain=plain, filtered_as_plain=filtered_as_plain,
                                 flat_fraction=flat_fraction, stats=stats)


def dumps_example(example: dict[str, Any]) -> str:
    """One JSONL line (no newline), deterministic."""
    return json.dumps(example, ensure_ascii=False)


def format_file(
    src: str | Path, dst: str | Path, *, plain: bool = True, filtered_as_plain: bool = False,
    flat_fraction: float = 0.0,
) -> FormatStats:
    """Format a ShareGPT JSON/JSONL file into an APAR JSONL file."""
    stats = FormatStats()
    records = read_records(src)
    with open(dst, "w", encoding="utf-8", newline="\n") as f:
        for ex in format_records(records, plain=plain, filtered_as_plain=filtered_as_plain,
                                 flat_fraction=flat_fraction, stats=stats):
            f.write(dumps_example(ex) + "\n")
    return stats


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read formatted examples back, checking the schema.

    Raises:
        ValueError: naming the line and the field that is wrong.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
            segs = ex.get("segments") if isinstance(ex, dict) else None
            if not isinstance(segs, list) or not segs:
                raise ValueError(f"{path}:{n}: 'segments' must be a non-empty list")
            for s in segs:
                if not isinstance(s, dict) or not isinstance(s.get("text"), str) or not isinstance(s.get("loss"), bool):
                    raise ValueError(f"{path}:{n}: each segment needs 'text' (str) and 'loss' (bool)")
            out.append(ex)
    return out
