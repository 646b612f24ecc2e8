#!/usr/bin/env python
"""Reproduce the apar-tiny demo model from scratch on a CPU (about 5 minutes on 2 cores).

Steps (all seeded):
1. Draw the synthetic corpus (`apar_rt.train.corpus`) without the held-out prompt keys;
   write the held-out prompts to samples/prompts/heldout.jsonl (`structured` true/false).
   Held-out choice: for every topic, 2 of its 20 list prompts (phrasing x count) and 1 of
   its 6 paragraph prompts, plus 8 of the 24 plain topic prompts, picked with
   random.Random(seed + 1); their exact prompt texts never occur in training.
2. Train a byte-level BPE tokenizer on the training texts (with the two control tokens).
3. Format the corpus with the APAR rules (`apar_rt.train.data_format`).
4. Create a random-init LlamaConfig model and fine-tune it (`apar_rt.train.trainer`).
5. Evaluate on the held-out prompts with transformers greedy decoding: how many
   structured prompts emit [SplitMask], and, decoding APAR-style (each [SplitMask] forks
   a child fed [SplitSop]), the longest branch against the whole answer's length.
6. Write the model card (README.md) and eval.json into the model folder.

Usage:
    python samples/train_demo.py                 # full run, writes samples/models/apar-tiny
    python samples/train_demo.py --eval-only     # re-evaluate an existing model
    python samples/train_demo.py --heads-only    # retrain only the Medusa heads of an existing model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the Medusa heads' distillation (`train_heads`; apar_rt/medusa/train.py says what it gained over
# the 2,500 constant-rate steps of batch 64 before it)
MEDUSA_STEPS, MEDUSA_BATCH, MEDUSA_LR = 10000, 256, 3e-3
MEDUSA_RECORD = ("positions", "first_loss", "last_loss", "head_top1_accuracy", "steps", "batch", "lr", "lr_scheduler")
sys.path.insert(0, str(ROOT))
# Before torch loads: OpenMP threads that sleep instead of spin. On a shared 2-core machine
# spinning threads slowed training steps 15x whenever another process was busy; passive
# waiting costs about 1.7x when the machine is idle. Set OMP_WAIT_POLICY=ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from apar_rt.train import corpus, data_format  # noqa: E402
from apar_rt.train.tokenizer import train_tokenizer  # noqa: E402
from apar_rt.train.trainer import TrainConfig, train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "samples/models/apar-tiny"))
    p.add_argument("--prompts-out", default=str(ROOT / "samples/prompts/heldout.jsonl"))
    p.add_argument("--work-dir", default=str(ROOT / "build/apar-tiny-work"), help="intermediate files")
    p.add_argument("--n-list", type=int, default=1000)
    p.add_argument("--n-paragraph", type=int, default=600)
    p.add_argument("--n-plain", type=int, default=600)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--flat-fraction", type=float, default=0.3,
                   help="structured answers also trained flat, so AR mode (forks banned) answers fully")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate --out")
    p.add_argument("--heads-only", action="store_true",
                   help="train only the Medusa heads of the model in --out (its weights as they are), then evaluate")
    p.add_argument("--medusa-steps", type=int, default=MEDUSA_STEPS, help="Medusa head training steps (0: no heads)")
    p.add_argument("--medusa-prompts-out", default=str(ROOT / "samples/prompts/medusa_train.jsonl"))
    return p.parse_args(argv)


# --------------------------------------------------------------------------- build


def build(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    times = {}

    t = time.perf_counter()
    held = set(corpus.heldout_keys(args.seed))
    samples = corpus.generate(args.seed, n_list=args.n_list, n_paragraph=args.n_paragraph,
                              n_plain=args.n_plain, exclude=held)
    corpus.write_jsonl([corpus.to_record(s, i) for i, s in enumerate(samples)], work / "corpus.jsonl")
    Path(args.prompts_out).parent.mkdir(parents=True, exist_ok=True)
    corpus.write_jsonl(corpus.heldout_records(args.seed), args.prompts_out)
    stats = data_format.format_file(work / "corpus.jsonl", work / "data.jsonl", flat_fraction=args.flat_fraction)
    times["corpus_s"] = time.perf_counter() - t
    print("corpus:", json.dumps(stats.as_dict()), flush=True)

    t = time.perf_counter()
    tok = train_tokenizer(corpus.tokenizer_texts(samples), work / "tokenizer", vocab_size=args.vocab_size)
    times["tokenizer_s"] = time.perf_counter() - t
    print(f"tokenizer: {len(tok)} tokens", flush=True)

    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(work / "init"))
    tok.save_pretrained(str(work / "init"))

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    res = train(TrainConfig(model=str(work / "init"), data=[str(work / "data.jsonl")], output=str(out),
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=30,
                            min_lr_ratio=0.05, seed=args.seed, device="cpu", threads=args.threads,
                            max_length=512))
    times["train_s"] = time.perf_counter() - t
    shutil.move(str(out / "train_log.jsonl"), str(work / "train_log.jsonl"))
    print(f"train: {res.steps} steps, loss {res.first_loss:.3f} -> {res.final_loss:.3f}, "
          f"{res.elapsed_s:.0f} s", flush=True)
    return {"times": times, "format_stats": stats.as_dict(), "train": {
        "steps": res.steps, "first_loss": round(res.first_loss, 4), "final_loss": round(res.final_loss, 4),
        "tokens": res.tokens, "batch_size": args.batch_size, "lr": args.lr,
        "examples": sum(stats.as_dict()["examples"].values())}}


# ---------------------------------------------------------------------------- eval


class _Bans:
    """APAR sampling bans as a transformers logits processor (see design section 3)."""

    def __init__(self, fork: int, child: int, may_fork: bool):
        self.fork, self.child, self.may_fork = fork, child, may_fork

    def __call__(self, input_ids, scores):
        scores[:, self.child] = -float("inf")
        last = input_ids[:, -1]
        ban = (last == self.fork) | (last == self.child)
        if not self.may_fork:
            ban[:] = True
        scores[ban, self.fork] = -float("inf")
        return scores


def _greedy(model, ids, max_new, eos, processor=None):
    import torch
    from transformers import LogitsProcessorList

    x = torch.tensor([ids])
    kw = {"logits_processor": LogitsProcessorList([processor])} if processor else {}
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos, **kw)
    return out[0, len(ids):].tolist()


def apar_decode(model, tok, prompt_ids, max_new=160, max_depth=2):
    """Greedy APAR decoding with HF generate, branch by branch.

    A branch's tokens do not depend on its children, so each branch is decoded on its
    own: the root first, then for every [SplitMask] at position i a child whose context
    is the parent's context + tokens[:i+1] + [SplitSop]. Root depth is 0; a branch at
    depth >= max_depth may not fork.

    Returns:
        (branches, text): branches as dicts (depth, new tokens incl. a forced
        [SplitSop]), and the recovered text (own text, then each child's, in order).
    """
    fork, child = tok.convert_tokens_to_ids(["[SplitMask]", "[SplitSop]"])
    eos = tok.eos_token_id
    branches = []

    def run(context, depth, forced):
        new = _greedy(model, context, max_new, eos, _Bans(fork, child, depth < max_depth))
        branches.append({"depth": depth, "tokens": len(new) + forced})
        text, start = "", 0
        for i, t in enumerate(new):
            if t == fork:
                text += tok.decode(new[start:i + 1], skip_special_tokens=True)
                text += run(context + new[:i + 1] + [child], depth + 1, 1)
                start = i + 1
        return text + tok.decode(new[start:], skip_special_tokens=True)

    text = run(list(prompt_ids), 0, 0)
    return branches, text


def check_answer(row: dict, text: str) -> dict:
    """Compare a recovered answer with the corpus: item count, repeats, and details."""
    import re

    if row["kind"] not in ("list", "paragraph"):
        return {}
    items = {t.lower(): f"{a} {b}" for _, _, its in corpus.TOPICS for t, a, b in its}
    if row["kind"] == "list":
        found = re.findall(r"^\d+\. ([^:\n]+): ([^\n]*)$", text.strip(), flags=re.M)
    else:
        found = re.findall(r"^[A-Z][a-z]+, ([^.\n]+)\. ([^\n]*)$", text.strip(), flags=re.M)
    titles = [t.lower() for t, _ in found]
    return {
        "count_ok": len(found) == row["count"],
        "repeats": len(titles) - len(set(titles)),
        "details_ok": sum(items.get(t.lower()) == d.strip() for t, d in found),
        "items": len(found),
    }


def evaluate(model_dir: str, prompts_path: str, max_new: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apar_rt.model.tokenizer import vicuna_v1_1_prompt

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    rows = [json.loads(line) for line in open(prompts_path, encoding="utf-8")]
    per = []
    with torch.no_grad():
        for r in rows:
            ids = tok(vicuna_v1_1_prompt(r["prompt"])).input_ids
            plain = _greedy(model, ids, max_new, tok.eos_token_id)
            branches, text = apar_decode(model, tok, ids, max_new)
            answer_tokens = len(tok(" " + text, add_special_tokens=False).input_ids) + 1  # + EOS
            ref_tokens = len(tok(" " + r["reference"], add_special_tokens=False).input_ids) + 1
            longest = max(b["tokens"] for b in branches)
            per.append({
                "id": r["id"], "prompt": r["prompt"], "structured": r["structured"], "forks": plain.count(fork),
                "max_depth": max(b["depth"] for b in branches),
                "branches": len(branches), "longest_branch": longest, "answer_tokens": answer_tokens,
                "reference_tokens": ref_tokens, "ratio": round(longest / answer_tokens, 3),
                "ratio_vs_reference": round(longest / ref_tokens, 3), "text": text,
                "greedy_raw": tok.decode(plain), **check_answer(r, text),
            })
    st = [p for p in per if p["structured"]]
    un = [p for p in per if not p["structured"]]
    forked = [p for p in st if p["forks"] > 0]

    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else None

    return {
        "structured_prompts": len(st),
        "structured_fork_rate": round(len(forked) / len(st), 3) if st else None,
        "unstructured_prompts": len(un),
        "unstructured_fork_rate": round(sum(p["forks"] > 0 for p in un) / len(un), 3) if un else None,
        "mean_ratio_longest_branch_to_answer": mean([p["ratio"] for p in forked]),
        "max_ratio_longest_branch_to_answer": max((p["ratio"] for p in forked), default=None),
        "mean_ratio_longest_branch_to_reference": mean([p["ratio_vs_reference"] for p in forked]),
        "max_depth_seen": max(p["max_depth"] for p in per),
        "structured_count_ok": sum(p["count_ok"] for p in st),
        "structured_with_repeats": sum(p["repeats"] > 0 for p in st),
        "items_with_right_detail": f"{sum(p['details_ok'] for p in st)}/{sum(p['items'] for p in st)}",
        "prompts": per,
    }


# ---------------------------------------------------------------------------- card


def write_card(out: Path, args, build_info: dict | None, ev: dict) -> None:
    cfg = json.loads((out / "config.json").read_text())
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    sample = next(p for p in ev["prompts"] if p["structured"] and p["forks"] > 0)
    b = build_info or json.loads((out / "eval.json").read_text()).get("build") or {}
    times = b.get("times", {})
    tr = b.get("train", {})
    med = b.get("medusa") or {}
    heads_only = ", retrained alone: `python samples/train_demo.py --heads-only`" if med.get("heads_only") else ""
    lines = [
        "# apar-tiny",
        "",
        "A tiny Llama trained from scratch for testing [apar-rt](../../../README.md): it answers a small",
        "synthetic \"practical tips\" domain and emits the APAR control tokens `[SplitMask]` ([Fork])",
        "after each list-item title (or after a paragraph's first sentence) and `</s>` at the end, so",
        "a runtime can fork children that write the details in parallel. It knows nothing else; do not",
        "use it for anything but testing APAR decoding.",
        "",
        "## Reproduce",
        "",
        "```",
        "python samples/train_demo.py" + (f" --seed {args.seed}" if args.seed else ""),
        "```",
        "",
        f"Everything is seeded (seed {args.seed}); on this project's 2-core CPU the whole script took "
        f"{b.get('total_s', float('nan')):.0f} s (training {times.get('train_s', float('nan')):.0f} s, "
        f"evaluation {times.get('eval_s', float('nan')):.0f} s) while other jobs shared the CPU; two runs gave a",
        "byte-identical `model.safetensors` (with the same libraries: under transformers 5.24 instead of 5.23 the",
        "weights came out different). The script sets `OMP_WAIT_POLICY=PASSIVE` before torch",
        "loads: with spinning OpenMP threads a busy neighbour process slowed training steps about 15x.",
        "",
        "## Model",
        "",
        f"- LlamaForCausalLM: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV heads), MLP "
        f"{cfg['intermediate_size']}, untied embeddings, RoPE theta "
        f"{cfg.get('rope_parameters', {}).get('rope_theta', cfg.get('rope_theta'))}, fp32.",
        f"- Vocabulary {cfg['vocab_size']}: byte-level BPE trained on the corpus; `<unk>`=0 (also pad), "
        f"`<s>`=1, `</s>`=2, `[SplitMask]`={cfg['vocab_size'] - 2}, `[SplitSop]`={cfg['vocab_size'] - 1} "
        "(special tokens, dropped by `decode(skip_special_tokens=True)`). Encoding adds `<s>`.",
        f"- `model.safetensors`: {size_mb:.1f} MB. `max_position_embeddings` {cfg['max_position_embeddings']};"
        " trained answers are under 300 tokens.",
        "- `eval.json` holds, per held-out prompt, the plain greedy output (`greedy_raw`, no bans) and the",
        "  recovered APAR answer (`text`): reference outputs for checking a runtime.",
        "- Prompt format: Vicuna v1.1, `A chat between ... questions. USER: {prompt} ASSISTANT:`; the",
        "  answer follows after a space and ends with `</s>`.",
        "",
        "## Data",
        "",
        "`apar_rt.train.corpus` draws list answers (`Here are 4 tips for staying healthy:` then",
        "`1. Title: detail. detail.` items), multi-paragraph answers and plain one-paragraph answers",
        "or small talk over 12 topics with 7 items each. `apar_rt.train.data_format` turns them",
        "into APAR examples with THUDM/APAR's ordered-list and paragraph rules: one main example",
        "with `[SplitMask]` after each title, one child example per item (main text up to its",
        "`[SplitMask]`, then `[SplitSop]`, then the detail, loss after `[SplitSop]` only), and",
        "plain answers unchanged. A fraction (`--flat-fraction`, 0.3) of the structured answers is",
        "also kept whole as a `flat` example, so that with [SplitMask] banned (apar-rt's AR mode, the",
        "baseline) the model still writes the complete answer: greedy still forks, since the APAR form",
        f"is the more likely one. Format stats: `{json.dumps(b.get('format_stats', {}).get('examples', {}))}`.",
        "",
        "Held-out prompts (`samples/prompts/heldout.jsonl`): for every topic, 2 of its 20 list",
        "prompts (5 phrasings x 3..6 items) and 1 of its 6 paragraph prompts, plus 8 of the 24",
        f"plain topic prompts, chosen with `random.Random(seed + 1)`; {ev['structured_prompts']} are",
        f"structured, {ev['unstructured_prompts']} are not. Their exact prompt texts never occur in",
        "training; their topics and items do, through other phrasings and counts.",
        "",
        "## Training",
        "",
        f"{tr.get('steps')} AdamW steps, batch {tr.get('batch_size')}, lr {tr.get('lr')} (warmup 30, cosine to 5%),",
        f"{tr.get('tokens')} tokens seen; loss {tr.get('first_loss')} -> {tr.get('final_loss')}.",
        "",
        "## Medusa heads (`medusa/`)",
        "",
        "Four Medusa-1 heads (one ResBlock each), self-distilled by `apar_rt.medusa.train` on the model's",
        "own greedy outputs (answers of up to 200 tokens), AR and APAR (every branch's context), for the",
        "240 prompts in `samples/prompts/medusa_train.jsonl` (corpus prompts, none held out);",
        f"{med.get('steps')} AdamW steps, batch {med.get('batch')}, lr {med.get('lr')} ({med.get('lr_scheduler')}; "
        f"{times.get('medusa_s')} s{heads_only}). Top-1 accuracy of heads 1..4",
        f"on that data: {[round(a, 3) for a in med.get('head_top1_accuracy', [])]}.",
        "Run them with `apar-rt generate --model samples/models/apar-tiny --medusa ...`.",
        "",
        "## Held-out evaluation (transformers greedy)",
        "",
        f"- Structured prompts that emit at least one `[SplitMask]`: "
        f"{ev['structured_fork_rate'] * 100:.0f}% of {ev['structured_prompts']}.",
        f"- Unstructured prompts that emit `[SplitMask]`: "
        f"{ev['unstructured_fork_rate'] * 100:.0f}% of {ev['unstructured_prompts']}.",
        "- Decoding APAR-style (each `[SplitMask]` forks a child fed `[SplitSop]`; the bans of the",
        "  design: `[SplitSop]` never sampled, `[SplitMask]` not right after `[SplitMask]`/`[SplitSop]`",
        f"  nor at depth >= 2; deepest branch seen: depth {ev['max_depth_seen']}), the longest branch in",
        "  tokens (a child's forced `[SplitSop]` counted) against the whole answer's token count: mean",
        f"  {ev['mean_ratio_longest_branch_to_answer']}, worst {ev['max_ratio_longest_branch_to_answer']}"
        f" (against the held-out reference answer: mean {ev['mean_ratio_longest_branch_to_reference']}).",
        f"- Answers checked against the corpus: right item count {ev['structured_count_ok']}/"
        f"{ev['structured_prompts']}, answers repeating an item {ev['structured_with_repeats']}, items "
        f"whose detail is the corpus detail {ev['items_with_right_detail']}.",
        "",
        f"Sample, held-out prompt `{sample['prompt']}`, greedy root output (special tokens shown):",
        "",
        "```",
        sample["greedy_raw"],
        "```",
        "",
        "Recovered APAR answer:",
        "",
        "```",
        sample["text"],
        "```",
        "",
        "## License",
        "",
        "Apache-2.0, like apar-rt. The corpus is synthetic and written for this project.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def medusa_prompts(seed: int, path: str, n: int = 240) -> list[str]:
    """Distinct corpus prompts (never a held-out one) for distilling the Medusa heads."""
    held = set(corpus.heldout_keys(seed))
    seen: dict[str, str] = {}
    for s in corpus.generate(seed + 7, n_list=400, n_paragraph=120, n_plain=80, exclude=held):
        seen.setdefault(s.prompt, s.key[0])
    rows = list(seen.items())[:n]
    Path(path).write_text("".join(json.dumps({"prompt": p, "kind": k}) + "\n" for p, k in rows))
    return [p for p, _ in rows]


def train_heads(args) -> dict:
    """Self-distil 4 Medusa heads into OUT/medusa, on both AR and APAR outputs (cosine learning rate,
    `train_medusa`'s default)."""
    from apar_rt.medusa.train import train_medusa

    prompts = medusa_prompts(args.seed, args.medusa_prompts_out)
    return train_medusa(args.out, prompts, steps=args.medusa_steps, lr=MEDUSA_LR, batch=MEDUSA_BATCH, mode="both",
                        seed=args.seed)


def record_heads(args, info: dict) -> None:
    """`train_heads`, its time and summary recorded in the build record `info` (with whether the
    heads were trained alone, `--heads-only`, after the model)."""
    t = time.perf_counter()
    heads = train_heads(args)
    info["times"]["medusa_s"] = time.perf_counter() - t
    info["medusa"] = {k: heads[k] for k in MEDUSA_RECORD} | {"heads_only": bool(args.heads_only)}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    out = Path(args.out)
    info = None
    if args.heads_only:   # the model's build record, with the new heads' summary
        info = json.loads((out / "eval.json").read_text())["build"]
        record_heads(args, info)
    elif not args.eval_only:
        info = build(args)
        if args.medusa_steps > 0:
            record_heads(args, info)
        info["total_build_s"] = round(time.perf_counter() - t0, 1)
    t = time.perf_counter()
    ev = evaluate(str(out), args.prompts_out, args.max_new_tokens, args.threads)
    if info is not None:
        if not args.heads_only:   # (a heads-only run keeps the build's own figures)
            info["times"]["eval_s"] = time.perf_counter() - t
            info["total_s"] = round(time.perf_counter() - t0, 1)
        info["times"] = {k: round(v, 1) for k, v in info["times"].items()}
    else:
        old = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
        info = old.get("build")
    (out / "eval.json").write_text(json.dumps({"build": info, "eval": ev}, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    write_card(out, args, info, ev)
    summary = {k: v for k, v in ev.items() if k != "prompts"}
    print(json.dumps({"build": info, "eval": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
