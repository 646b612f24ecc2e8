"""Side-by-side throughput: apar-rt generate against transformers generate on the same checkpoint.

Runs alternate (apar-rt, transformers, apar-rt, ...) so that machine noise hits both alike;
reports medians and the ratio. Every request decodes exactly `max_tokens` tokens (EOS ignored)
so both sides do the same work.
"""

from __future__ import annotations

import json
import statistics
import time

from apar_rt.prompts import DEFAULT_PROMPTS


def _prompts(n: int) -> list[str]:
    return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n)]


def bench_generate(model: str, batch_sizes=(1, 8), max_tokens: int = 64, repeats: int = 5,
                   mode: str = "ar", backend: str = "torch", threads: int | None = None,
                   engine: str | None = None) -> list[dict]:
    """engine: an engine folder of the same model for apar-rt's side (its manifest's backend)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apar_rt import LLM, SamplingParams

    if threads:
        torch.set_num_threads(threads)
    if engine is not None:
        from apar_rt.build.manifest import read_manifest
        backend = read_manifest(engine).backend
        llm = LLM(engine, backend=backend, mode=mode, device="cpu", max_num_seqs=max(batch_sizes))
    else:
        llm = LLM(model, backend=backend, mode=mode, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = []
    for bs in batch_sizes:
        prompts = _prompts(bs)
        ids = [llm.engine.encode(p) for p in prompts]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

        def run_ours():
            outs = llm.generate(prompt_token_ids=ids, params=params)
            return sum(o.stats["generated_tokens"] for o in outs), sum(o.stats["decode_steps"] for o in outs)

        texts = [tok.decode(i, skip_special_tokens=False) for i in ids]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

        def run_hf():
            with torch.no_grad():
                out = hf.generate(**enc, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  pad_token_id=tok.pad_token_id)
            return (out.shape[1] - enc.input_ids.shape[1]) * bs, max_tokens

        run_ours(), run_hf()  # warm-up
        ours, theirs = [], []
        ntok_ours = ntok_hf = 0
        for _ in range(repeats):
            t = time.perf_counter()
            ntok_ours, _ = run_ours()
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            ntok_hf, _ = run_hf()
            theirs.append(time.perf_counter() - t)
        m_ours, m_hf = statistics.median(ours), statistics.median(theirs)
        rows.append({"batch": bs, "mode": mode, "backend": backend, "max_tokens": max_tokens,
                     "apar_rt_tok_s": ntok_ours / m_ours, "transformers_tok_s": ntok_hf / m_hf,
                     "ratio": (ntok_ours / m_ours) / (ntok_hf / m_hf),
                     "apar_rt_s": m_ours, "transformers_s": m_hf, "repeats": repeats})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'batch':>5} {'mode':>4} {'backend':>11} {'apar-rt tok/s':>14} {'HF tok/s':>10} {'ratio':>6}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['mode']:>4} {r['backend']:>11} {r['apar_rt_tok_s']:>14.1f} "
                     f"{r['transformers_tok_s']:>10.1f} {r['ratio']:>6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    print(json.dumps(bench_generate(sys.argv[1]), indent=1))
