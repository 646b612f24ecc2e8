"""APAR against AR (and each with Medusa) on a prompt set: forks, decode steps, Medusa acceptance,
and whether the recovered text keeps numbered items in order with their details.

Decode steps are engine steps in which a request produced tokens: the latency measure that
APAR and Medusa shrink. All prompts of a variant run together in flight.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

ITEM = re.compile(r"^(\d+)\.\s+([^:\n]+):(.*)$")


def load_prompts(path: str | Path) -> list[dict]:
    """JSONL rows with at least "prompt"; "structured" (bool) is used when present."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for r in rows:
        r.setdefault("structured", True)
    return rows


def items_in_order(text: str) -> bool | None:
    """For a numbered-list answer: items numbered 1..n in order, each title followed by detail text.
    None when the text has no numbered items."""
    items = [ITEM.match(line.strip()) for line in text.splitlines()]
    items = [m for m in items if m]
    if not items:
        return None
    numbers = [int(m.group(1)) for m in items]
    return numbers == list(range(1, len(items) + 1)) and all(len(m.group(3).strip()) > 0 for m in items)


def run_variant(model: str, prompts: list[str], *, mode: str, medusa: bool, max_tokens: int, backend: str,
                tree: str | None) -> list[dict]:
    from apar_rt import LLM, SamplingParams

    kw = {"medusa": True, "medusa_tree": tree} if medusa else {}
    llm = LLM(model, backend=backend, mode=mode, dtype="float32", num_blocks=8192, **kw)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens))
    return [{"text": o.text, **o.stats, "error": o.error} for o in outs]


def bench_apar(model: str, prompts_file: str, *, max_tokens: int = 400, medusa: bool = False,
               backend: str = "torch", tree: str | None = None, log=print) -> dict:
    """`model` is a model folder, or an engine folder for a built backend; a model folder with a
    built backend is first built into a temporary engine folder."""
    from apar_rt.build.manifest import MANIFEST_NAME

    if backend != "torch" and not (Path(model) / MANIFEST_NAME).is_file():
        import tempfile

        from apar_rt.build.builder import BuildOptions, build

        tmp = tempfile.TemporaryDirectory(prefix="apar-bench-")
        engine = str(Path(tmp.name) / "engine")
        log(f"{model} is a model folder: building a {backend} engine from it in {engine} ...")
        build(BuildOptions(model=model, output=engine, backend=backend), progress=False, log=lambda m: None)
        with tmp:
            return bench_apar(engine, prompts_file, max_tokens=max_tokens, medusa=medusa, backend=backend,
                              tree=tree, log=log)
    rows = load_prompts(prompts_file)
    prompts = [r["prompt"] for r in rows]
    variants = [("ar", False), ("apar", False)] + ([("ar", True), ("apar", True)] if medusa else [])
    results = {f"{m}{'+medusa' if md else ''}": run_variant(model, prompts, mode=m, medusa=md,
                                                             max_tokens=max_tokens, backend=backend, tree=tree)
               for m, md in variants}
    structured = [i for i, r in enumerate(rows) if r["structured"]]
    lists = [i for i, r in enumerate(rows) if r.get("kind", "list") == "list" and r["structured"]]
    ar_steps = [results["ar"][i]["decode_steps"] for i in structured]
    summary = {"prompts": len(rows), "structured": len(structured), "max_tokens": max_tokens, "variants": {}}
    for name, res in results.items():
        steps = [res[i]["decode_steps"] for i in structured]
        ordered = [items_in_order(res[i]["text"]) for i in lists]
        summary["variants"][name] = {
            "fork_rate_structured": sum(res[i]["forks"] > 0 for i in structured) / max(len(structured), 1),
            "mean_decode_steps_structured": statistics.mean(steps) if steps else 0.0,
            "decode_steps_ratio_vs_ar": (statistics.mean(s / a for s, a in zip(steps, ar_steps) if a)
                                         if steps else 0.0),
            "mean_generated_tokens_structured": statistics.mean(res[i]["generated_tokens"] for i in structured),
            "mean_accepted_tokens_per_step": statistics.mean(r["accepted_tokens_per_step"] for r in res),
            "list_items_in_order": sum(bool(o) for o in ordered) / max(len(ordered), 1),
            "errors": sum(r["error"] is not None for r in res),
        }
    summary["samples"] = {name: res[structured[0]]["text"] for name, res in results.items()} if structured else {}
    return summary


def format_summary(s: dict) -> str:
    head = (f"{'variant':<13} {'fork rate':>9} {'steps':>7} {'steps/AR':>8} {'tokens':>7} {'acc/step':>8} "
            f"{'items ok':>8}")
    lines = [f"{s['prompts']} prompts ({s['structured']} structured), max_tokens {s['max_tokens']}", head]
    for name, v in s["variants"].items():
        lines.append(f"{name:<13} {v['fork_rate_structured']:>9.0%} {v['mean_decode_steps_structured']:>7.1f} "
                     f"{v['decode_steps_ratio_vs_ar']:>8.3f} {v['mean_generated_tokens_structured']:>7.1f} "
                     f"{v['mean_accepted_tokens_per_step']:>8.2f} {v['list_items_in_order']:>8.0%}")
    return "\n".join(lines)
