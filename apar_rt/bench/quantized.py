"""Quantized onnxruntime engines against the unquantized one: accuracy and tokens/s.

Accuracy (`accuracy`), per prompt, AR mode, greedy:
* greedy agreement: the quantized engine's tokens equal the reference engine's (whole answer),
  and the share of the reference's tokens produced before the first difference;
* teacher-forced logits: the prompt plus the reference's answer go through both engines in one
  prefill step; the largest |logit difference| over every position, and the share of positions
  whose argmax agrees.

Speed (`bench_quantized`): the same engine loop on each engine, runs interleaved (fp32, int8,
int4, fp32, ...) so machine noise hits all alike; each request decodes exactly `max_tokens`
tokens (EOS ignored); tokens/s is generated tokens over the median wall time of `generate`.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def prefill_logits(backend, ids: list[int], block_size: int) -> np.ndarray:
    """float32 logits [len(ids), vocab] of one sequence prefilled in one step (fresh pool)."""
    from apar_rt.core import StepInput

    n = len(ids)
    nb = -(-n // block_size)
    backend.allocate_kv(nb + 1, block_size)
    step = StepInput(input_ids=np.asarray(ids, np.int32), positions=np.arange(n, dtype=np.int32),
                     block_tables=np.arange(1, nb + 1, dtype=np.int32)[None, :],
                     context_lens=np.zeros(1, np.int32), query_start=np.array([0, n], np.int32),
                     mask=np.tril(np.ones((n, n), bool)),
                     slot_mapping=np.arange(block_size, block_size + n, dtype=np.int32),
                     logits_indices=np.arange(n, dtype=np.int32))
    return np.asarray(backend.forward(step), np.float32)


def _llm(engine: str, mode: str = "ar", **kw):
    from apar_rt import LLM

    return LLM(engine, backend="onnxruntime", mode=mode, **kw)


def accuracy(reference: str, quantized: str, prompts: list[str], max_tokens: int = 64) -> dict:
    """Greedy agreement and teacher-forced logit error of engine `quantized` against `reference`."""
    from apar_rt import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ref_llm, q_llm = _llm(reference), _llm(quantized)
    ref = ref_llm.generate(prompts, params)
    got = q_llm.generate(prompts, params)
    same, prefix, worst, agree, positions = 0, [], 0.0, 0, 0
    bs = ref_llm.engine.config.block_size
    for r, g in zip(ref, got):
        rt, gt = r.branches[0]["token_ids"], g.branches[0]["token_ids"]
        same += rt == gt
        k = next((i for i, (a, b) in enumerate(zip(rt, gt)) if a != b), min(len(rt), len(gt)))
        prefix.append(k / max(len(rt), 1) if rt != gt else 1.0)
        ids = list(r.prompt_token_ids) + list(rt)
        lr = prefill_logits(ref_llm.engine.backend, ids, bs)
        lq = prefill_logits(q_llm.engine.backend, ids, bs)
        worst = max(worst, float(np.abs(lr - lq).max()))
        agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        positions += len(ids)
    return {"prompts": len(prompts), "greedy_same": same, "greedy_same_rate": same / len(prompts),
            "mean_matched_prefix": float(np.mean(prefix)), "max_abs_logit_error": worst,
            "teacher_forced_argmax_agreement": agree / positions, "positions": positions,
            "logit_range": float(lr.max() - lr.min())}


def bench_quantized(engines: dict[str, str], batch_sizes=(1, 8), max_tokens: int = 64, repeats: int = 5,
                    threads: int | None = None) -> list[dict]:
    """tokens/s of each engine folder ({label: path}), interleaved; one row per batch size."""
    from apar_rt import SamplingParams
    from apar_rt.bench.backends import _ort_llm
    from apar_rt.bench.generate import _prompts
    from apar_rt.build.manifest import read_manifest

    kw = {"mode": "ar", "max_num_seqs": max(batch_sizes), "num_blocks": 1024}
    sides = {}
    for label, path in engines.items():
        kw["block_size"] = read_manifest(path).block_size
        sides[label] = _ort_llm(path, threads, dict(kw))
    rows = []
    for bs in batch_sizes:
        first = next(iter(sides.values()))
        ids = [first.engine.encode(p) for p in _prompts(bs)]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        walls = {label: [] for label in sides}
        tokens = {}
        for label, llm in sides.items():      # warm-up
            llm.generate(prompt_token_ids=ids, params=params)
        for _ in range(repeats):
            for label, llm in sides.items():
                t = time.perf_counter()
                outs = llm.generate(prompt_token_ids=ids, params=params)
                walls[label].append(time.perf_counter() - t)
                tokens[label] = sum(o.stats["generated_tokens"] for o in outs)
        row = {"batch": bs, "max_tokens": max_tokens, "repeats": repeats}
        base = None
        for label in sides:
            tps = tokens[label] / statistics.median(walls[label])
            row[f"{label}_tok_s"] = tps
            base = base or tps
            row[f"{label}_vs_{next(iter(sides))}"] = tps / base
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    return "\n".join("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
                     for r in rows)
