"""One GPU check, one command: correctness and speed of apar-rt on a CUDA GPU.

    python -m apar_rt.bench.gpu_check --out DIR            # on a GPU (fits an 8-minute slot on an H200)
    python -m apar_rt.bench.gpu_check --out DIR --dry-run  # on a CPU: the same code paths, tiny sizes

Sections (each recorded even if another fails; DIR/gpu_check.json is rewritten after each):
1. copy bandwidth (device-to-device, bytes read + written): the HBM ceiling of this run;
2. the Triton attention kernel vs the torch reference (float64 on upcast inputs) on fresh random
   packed steps: prefill, decode, draft trees, mixed, GQA, fp16/bf16/fp32, poisoned outputs;
3. oracles on the device: AR greedy tokens of a tiny random Llama == transformers `generate`;
   every APAR branch token == transformers' argmax for that branch's context;
4. a 7B-shaped Llama (32 layers, hidden 4096, 32 heads, vocab 32000, random fp16 weights made on
   the device): median decode-step time at batch 1/8/64 and contexts 512/2048, eager and
   CUDA-graphed, against the HBM floor (weights + KV read over the measured copy bandwidth) and
   against transformers `generate` (sdpa) on the same weights; at batch 1 also the device
   activities (kernels, copies) one step launches, which its CUDA graph replays;
5. the attention kernel alone vs `scaled_dot_product_attention` on the same decode batch held as
   contiguous KV, and a mixed step (32 decodes + a 980-token prefill chunk) vs its parts;
6. the device sampler (`backends/torch_sampler.py`) against the numpy reference on random mixed
   batches (tokens and ok flags equal, probes to rounding) and Medusa's ranked top-k, and its time
   at 256 rows x vocab 32000 (greedy, top-k 50, top-p 0.9) against the old path (logits copied
   to the host, then the numpy reference).
A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

SEVEN_B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY_7B_SHAPED = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
REL_TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}
PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read"]


class Check:
    """Collects sections into one JSON document, written after every section."""

    def __init__(self, out_dir: Path, dry_run: bool) -> None:
        self.out_dir = out_dir
        self.path = out_dir / "gpu_check.json"
        self.data: dict = {"dry_run": dry_run, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn, *args):
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            result = fn(*args)
            self.data["sections"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **result}
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            traceback.print_exc()
            self.data["sections"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                           "seconds": round(time.perf_counter() - t0, 1)}
            result = None
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        return result


# ---- timing ---------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, *, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of fn() in ms, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_ms(fn, device, reps: int = 50) -> float:
    """Median device time of fn() in ms: CUDA events around each call, L2 flushed between calls
    (triton's do_bench). Not do_bench_cudagraph: on the H200 with Triton 3.6 it reported a 2 GiB
    copy at 1.55 ms where events and do_bench agreed on 1.00 ms."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return median_ms(fn, device, warmup=1, reps=3)


def device_ops_per_call(fn, device) -> int | None:
    """How many device activities (kernels, copies, memsets) one call of fn() launches, from the
    profiler's CUDA trace: what a CUDA graph of it replays one by one. None off CUDA, or when the
    profiler cannot trace the device (e.g. no CUPTI)."""
    if device.type != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:   # a diagnostic: never fail the section for it
        print(f"   (device activity count unavailable: {e})", flush=True)
        return None


# ---- section 1: bandwidth -------------------------------------------------------------------------

def copy_bandwidth(device, dry: bool) -> dict:
    import torch

    n = (1 << 20) if dry else (1 << 30)                    # fp16 elements: 2 GiB on a GPU
    x = torch.randn(n, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    if device.type == "cuda":                    # an idle GPU starts at low clocks: warm it for ~1 s
        a = torch.randn(8192, 8192, dtype=torch.float16, device=device)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            a @ a
            y.copy_(x)
        sync(device)
        del a
    ms = min(kernel_ms(lambda: y.copy_(x), device) for _ in range(3))
    bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)
    info = {"copy_bytes": 2 * x.numel() * 2, "copy_ms": ms, "bandwidth_GBps": bw / 1e9}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1))
    import triton
    info.update(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    return info


# ---- section 2: kernel accuracy -------------------------------------------------------------------

def random_step(gen, seqs, *, hq, hkv, d, block_size, dtype, device, poison=1e4):
    """A packed step: seqs = [(context_len, local_mask [n][n] of bools)], shuffled blocks, the
    pool's unused slots poisoned with large values, garbage mask entries past each sequence."""
    import torch

    nblocks = [-(-c // block_size) for c, _ in seqs]
    num_blocks = 1 + sum(nblocks) + 2
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(nblocks + [1]) + 1
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    it = iter(perm)
    for b, nb in enumerate(nblocks):
        for i in range(nb):
            tables[b, i] = next(it)
    shape = (num_blocks, block_size, hkv, d)
    kc = torch.rand(shape, generator=gen) * poison
    vc = -torch.rand(shape, generator=gen) * poison
    for b, (c, _) in enumerate(seqs):
        for p in range(c):
            kc[tables[b, p // block_size], p % block_size] = torch.randn(hkv, d, generator=gen)
            vc[tables[b, p // block_size], p % block_size] = torch.randn(hkv, d, generator=gen)
    T = sum(len(m) for _, m in seqs)
    max_q = max([len(m) for _, m in seqs] + [1]) + 1
    mask = torch.rand(T, max_q, generator=gen) < 0.5
    qs = [0]
    for _, m in seqs:
        n = len(m)
        if n:
            mask[qs[-1]:qs[-1] + n, :n] = torch.tensor(m)
        qs.append(qs[-1] + n)
    q, k, v = (torch.randn(T, h, d, generator=gen) for h in (hq, hkv, hkv))
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), k_cache=to(kc), v_cache=to(vc), block_tables=tables.to(device),
                context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device),
                query_start=torch.tensor(qs, dtype=torch.int32, device=device), mask=mask.to(device),
                scale=d ** -0.5)


def _causal(n):
    return [[j <= i for j in range(n)] for i in range(n)]


def _tree(gen, n):
    import torch

    from apar_rt.medusa.tree import ancestor_mask

    return ancestor_mask([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])


def kernel_accuracy(device, dry: bool) -> dict:
    import torch

    from apar_rt.kernels.tree_attention import tree_paged_attention
    from apar_rt.ops.tree_attention import tree_paged_attention_reference

    gen = torch.Generator().manual_seed(int(time.time()))           # fresh inputs every run
    s = 1 if dry else 4                                              # context scale
    R = lambda a, b: int(torch.randint(a, b, (1,), generator=gen))  # noqa: E731
    cases = {
        "prefill MHA d64 fp16 bs16": (dict(hq=8, hkv=8, d=64, block_size=16, dtype=torch.float16),
                                      [(R(0, 40 * s), _causal(R(1, 60 * s))) for _ in range(3)]),
        "decode GQA d128 bf16 bs32": (dict(hq=32, hkv=8, d=128, block_size=32, dtype=torch.bfloat16),
                                      [(R(0, 300 * s), [[True]]) for _ in range(8)]),
        "trees GQA d128 fp16 bs16": (dict(hq=16, hkv=4, d=128, block_size=16, dtype=torch.float16),
                                     [(R(1, 100 * s), _tree(gen, R(2, 30))) for _ in range(4)]),
        "mixed GQA d64 bf16 bs16": (dict(hq=8, hkv=2, d=64, block_size=16, dtype=torch.bfloat16),
                                    [(R(0, 50 * s), _causal(R(1, 50))), (R(5, 100 * s), [[True]]),
                                     (R(1, 60 * s), _tree(gen, 9)), (0, [[True]]), (37, _causal(20))]),
        "mixed MHA d128 fp32 bs32": (dict(hq=4, hkv=4, d=128, block_size=32, dtype=torch.float32),
                                     [(R(0, 90 * s), _causal(R(1, 30))), (R(1, 90 * s), [[True]]),
                                      (R(1, 90 * s), _tree(gen, 7))]),
        "long decode split d128 fp16": (dict(hq=32, hkv=32, d=128, block_size=16, dtype=torch.float16),
                                        [(R(200 * s, 500 * s), [[True]])]),
    }
    results = {}
    for name, (shape, seqs) in cases.items():
        st = random_step(gen, seqs, device=device, **shape)
        out = torch.full_like(st["q"], float("nan"))
        args = [st[k] for k in ("q", "k", "v", "k_cache", "v_cache", "block_tables", "context_lens",
                                "query_start", "mask")]
        tree_paged_attention(*args, st["scale"], out=out)
        ref = tree_paged_attention_reference(*(a.double() for a in args[:5]), *args[5:], st["scale"])
        unwritten = int(torch.isnan(out).sum())
        err = float((out.double() - ref).norm() / ref.norm())
        dt = str(shape["dtype"]).replace("torch.", "")
        results[name] = {"tokens": int(st["q"].shape[0]), "rel_error": err, "tolerance": REL_TOL[dt],
                         "unwritten": unwritten, "pass": unwritten == 0 and err < REL_TOL[dt]}
    return {"cases": results, "all_pass": all(r["pass"] for r in results.values())}


# ---- section 3: oracles ---------------------------------------------------------------------------

def oracles(device, dry: bool) -> dict:
    import torch

    from apar_rt import LLM, SamplingParams
    from apar_rt.testing.oracles import assert_branches_follow_argmax, hf_greedy
    from apar_rt.testing.tiny_model import make_tiny_checkpoint

    dev = str(device)
    with tempfile.TemporaryDirectory() as tmp:
        hf, tok = make_tiny_checkpoint(tmp, seed=0, hidden=256, num_heads=4, num_kv_heads=2, layers=2,
                                       intermediate=512, weight_std=0.08)
        hf = hf.to(device).float().eval()
        n_new = 24
        llm = LLM(tmp, backend="torch", device=dev, dtype="float32", mode="ar", raw=True, num_blocks=40,
                  block_size=16)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=n_new))
        ar = []
        for o in outs:
            want = hf_greedy(hf, o.prompt_token_ids, n_new, tok.eos_token_id)
            ar.append(o.branches[0]["token_ids"] == want)
        fork, child = tok.convert_tokens_to_ids("[SplitMask]"), tok.convert_tokens_to_ids("[SplitSop]")
        apar = LLM(tmp, backend="torch", device=dev, dtype="float32", mode="apar", raw=True, num_blocks=24,
                   block_size=16)
        aouts = apar.generate(PROMPTS[:4], SamplingParams(max_tokens=40, logit_bias={fork: 4.0}))
        apar_ok, forks = [], 0
        for o in aouts:
            forks += o.stats["forks"]
            try:
                assert_branches_follow_argmax(hf, o, fork, child, 4.0, 2)
                apar_ok.append(True)
            except AssertionError as e:
                apar_ok.append(f"mismatch {e}")
        del llm, apar
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return {"ar_greedy_equal": ar, "ar_pass": all(ar), "apar_oracle": apar_ok, "apar_forks": forks,
            "apar_pass": all(x is True for x in apar_ok) and forks > 0}


# ---- section 4: 7B-shaped decode steps --------------------------------------------------------------

class _IdTokenizer:
    """Token ids as text: the 7B model has random weights and no tokenizer."""

    eos_token_id = None
    all_special_ids = ()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def make_7b(device, dry: bool):
    """Transformers' Llama with random fp16 weights made on the device, and ours sharing them."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from apar_rt.config import ModelConfig
    from apar_rt.model.llama import LlamaForCausalLM, half_swap, rope_inv_freq

    shape = TINY_7B_SHAPED if dry else SEVEN_B
    dtype = torch.float32 if dry else torch.float16
    hf_cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = HFLlama(hf_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    with torch.device("meta"):
        ours = LlamaForCausalLM(cfg)
    ours.load_state_dict(hf.state_dict(), strict=False, assign=True)   # the same tensors, not a copy
    ours.inv_freq = rope_inv_freq(cfg).to(device)          # non-persistent buffers: not in the state dict
    ours.rope_swap = half_swap(cfg.head_dim).to(device)
    ours.eval()
    return hf, ours, cfg


def decode_step_input(gen, batch: int, ctx: int, block_size: int, vocab: int, first_block: int = 1):
    """A plain decode step: `batch` sequences of context `ctx`, blocks shuffled."""
    import numpy as np
    import torch

    from apar_rt.core import StepInput

    nb = -(-(ctx + 1) // block_size)
    ids = (torch.randperm(batch * nb, generator=gen) + first_block).numpy().astype(np.int32)
    tables = ids.reshape(batch, nb)
    slots = tables[:, ctx // block_size] * block_size + ctx % block_size
    return StepInput(
        input_ids=torch.randint(3, vocab, (batch,), generator=gen).numpy().astype(np.int32),
        positions=np.full(batch, ctx, np.int32), block_tables=tables,
        context_lens=np.full(batch, ctx, np.int32), query_start=np.arange(batch + 1, dtype=np.int32),
        mask=np.ones((batch, 1), bool), slot_mapping=slots.astype(np.int32),
        logits_indices=np.arange(batch, dtype=np.int32)), batch * nb


def decode_steps(device, dry: bool, bandwidth_GBps: float | None) -> dict:
    import torch

    from apar_rt.backends.torch_backend import TorchBackend

    batches, contexts = ((1, 2, 4), (32, 64)) if dry else ((1, 8, 64), (512, 2048))
    reps = 3 if dry else 20
    gen = torch.Generator().manual_seed(0)
    hf, ours, cfg = make_7b(device, dry)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                       if "embed_tokens" not in n)
    elem = next(ours.parameters()).element_size()
    kv_token_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    block_size = 16
    num_blocks = max(batches) * -(-(max(contexts) + 1) // block_size) + 1
    backend = TorchBackend.from_module(ours, cfg, device=device)
    backend.allocate_kv(num_blocks, block_size)
    for c in (*backend.k_caches, *backend.v_caches):
        c.normal_()                                                # never time on zeros
    rows = []
    for ctx in contexts:
        for B in batches:
            step, _ = decode_step_input(gen, B, ctx, block_size, cfg.vocab_size)
            graphed = median_ms(lambda: backend.forward(step), device, reps=reps)
            graphs, backend._graphs = backend._graphs, None
            eager = median_ms(lambda: backend.forward(step), device, reps=max(3, reps // 2))
            # what the graph replays: at batch 1 the gap to the floor is per-launch cost times this
            ops = device_ops_per_call(lambda: backend.forward(step), device) if B == 1 else None
            backend._graphs = graphs
            floor_bytes = weight_bytes + B * ctx * kv_token_bytes
            row = {"batch": B, "context": ctx, "step_ms_graph": graphed, "step_ms_eager": eager,
                   "floor_bytes": floor_bytes, "device_ops_per_step": ops}
            if bandwidth_GBps:
                row["floor_ms"] = floor_bytes / (bandwidth_GBps * 1e9) * 1e3
                row["x_floor"] = graphed / row["floor_ms"]
            rows.append(row)
            print(f"   ours B={B} ctx={ctx}: {graphed:.2f} ms (eager {eager:.2f})", flush=True)
    backend.k_caches = backend.v_caches = []
    backend._graphs = backend._buffers = None
    backend = None                                 # frees the pool before transformers runs
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # transformers generate (sdpa) on the same weights: decode step = (t(1 + S new) - t(1 new)) / S
    S = 4 if dry else 16

    def hf_generate(ids, n):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0, eos_token_id=2)

    warm = torch.randint(3, cfg.vocab_size, (1, 16), generator=gen).to(device)
    hf_generate(warm, 2)
    for row in rows:
        ids = torch.randint(3, cfg.vocab_size, (row["batch"], row["context"]), generator=gen).to(device)
        try:
            t1 = median_ms(lambda: hf_generate(ids, 1), device, warmup=0, reps=1)
            tS = median_ms(lambda: hf_generate(ids, 1 + S), device, warmup=0, reps=1)
            row["hf_step_ms"] = (tS - t1) / S
            if row["hf_step_ms"] > 0:                 # a noisy CPU dry run can make it negative
                row["x_hf_speedup"] = row["hf_step_ms"] / row["step_ms_graph"]
        except torch.cuda.OutOfMemoryError as e:
            row["hf_step_ms"] = f"OOM: {e}"[:200]
            torch.cuda.empty_cache()
        print(f"   hf B={row['batch']} ctx={row['context']}: {row.get('hf_step_ms')}", flush=True)
    engine = engine_throughput(device, dry, hf, ours, cfg)
    return {"model": "7B-shaped" if not dry else "tiny", "weight_bytes": weight_bytes, "rows": rows,
            "engine": engine}


def engine_throughput(device, dry: bool, hf, ours, cfg) -> dict:
    """The whole engine loop (schedule, forward, sample, update) at batch 64, against generate()."""
    import torch

    from apar_rt.apar import ControlTokens
    from apar_rt.backends.torch_backend import TorchBackend
    from apar_rt.config import EngineConfig
    from apar_rt.core import SamplingParams
    from apar_rt.engine import Engine

    B, prompt, new = (4, 16, 8) if dry else (64, 512, 64)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, cfg.vocab_size, (B, prompt), generator=gen)
    blocks = B * -(-(prompt + new) // 16) + 8
    backend = TorchBackend.from_module(ours, cfg, device=device)
    engine = Engine(backend, _IdTokenizer(), cfg, EngineConfig(num_blocks=blocks, block_size=16, max_num_seqs=B,
                                                              max_num_tokens=8192, mode="ar"),
                    control=ControlTokens())

    def run():
        for i in range(B):
            engine.add_request(None, SamplingParams(max_tokens=new), prompt_token_ids=prompts[i].tolist())
        n = 0
        while engine.has_unfinished():
            for o in engine.step():
                n += sum(len(d.new_token_ids) for d in o.deltas or ())
        return n

    run()                                                        # captures the graphs, warms up
    sync(device)
    t0 = time.perf_counter()
    generated = run()
    sync(device)
    ours_s = time.perf_counter() - t0
    engine = backend = None
    ids = prompts.to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, pad_token_id=0, eos_token_id=2)
    sync(device)
    hf_s = time.perf_counter() - t0
    return {"batch": B, "prompt": prompt, "new_tokens": new, "generated": generated, "apar_rt_seconds": ours_s,
            "apar_rt_tokens_per_s": generated / ours_s, "hf_seconds": hf_s, "hf_tokens_per_s": B * new / hf_s,
            "x_hf": (generated / ours_s) / (B * new / hf_s)}


# ---- section 5: attention alone -----------------------------------------------------------------------

def attention_vs_sdpa(device, dry: bool, bandwidth_GBps: float | None) -> dict:
    import torch
    import torch.nn.functional as F

    from apar_rt.kernels.tree_attention import tree_paged_attention

    dtype = torch.float32 if dry else torch.float16
    H, D, bs = (4, 64, 16) if dry else (32, 128, 16)
    cases = [(2, 64)] if dry else [(1, 2048), (8, 2048), (64, 512), (64, 2048)]
    gen = torch.Generator().manual_seed(2)
    rows = []
    for B, ctx in cases:
        nb = -(-ctx // bs)
        num_blocks = B * nb + 1
        kc = torch.randn(num_blocks, bs, H, D, dtype=dtype, device=device)
        vc = torch.randn_like(kc)
        tables = (torch.randperm(B * nb, generator=gen) + 1).view(B, nb).to(torch.int32).to(device)
        q = torch.randn(B, H, D, dtype=dtype, device=device)
        k, v = torch.randn_like(q), torch.randn_like(q)
        ctx_lens = torch.full((B,), ctx - 1, dtype=torch.int32, device=device)    # + itself = ctx keys
        qs = torch.arange(B + 1, dtype=torch.int32, device=device)
        mask = torch.ones(B, 1, dtype=torch.bool, device=device)
        out = torch.empty_like(q)
        ours = kernel_ms(lambda: tree_paged_attention(q, k, v, kc, vc, tables, ctx_lens, qs, mask, D ** -0.5,
                                                      out=out), device)
        # the same keys, contiguous: [B, H, ctx, D]
        gather = tables.long()
        K = kc[gather].reshape(B, nb * bs, H, D)[:, :ctx].transpose(1, 2).contiguous()
        V = vc[gather].reshape(B, nb * bs, H, D)[:, :ctx].transpose(1, 2).contiguous()
        K[:, :, ctx - 1], V[:, :, ctx - 1] = k, v
        sdpa = kernel_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], K, V), device)
        ref = F.scaled_dot_product_attention(q[:, :, None].float(), K.float(), V.float())[:, :, 0]
        got = tree_paged_attention(q, k, v, kc, vc, tables, ctx_lens, qs, mask, D ** -0.5).float()
        row = {"batch": B, "context": ctx, "ours_ms": ours, "sdpa_ms": sdpa, "x_sdpa": ours / sdpa,
               "rel_error_vs_sdpa": float((got - ref).norm() / ref.norm())}
        if bandwidth_GBps:
            row["floor_ms"] = 2 * B * ctx * H * D * q.element_size() / (bandwidth_GBps * 1e9) * 1e3
        if B == 64 and ctx == 2048:
            sweep = {}
            for block_n, warps in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8)):
                sweep[f"n{block_n}w{warps}"] = kernel_ms(lambda: tree_paged_attention(
                    q, k, v, kc, vc, tables, ctx_lens, qs, mask, D ** -0.5, out=out, block_n=block_n,
                    num_warps=warps), device)
            row["tile_sweep_ms"] = sweep
        rows.append(row)
        print(f"   attention B={B} ctx={ctx}: ours {ours:.3f} ms, sdpa {sdpa:.3f} ms", flush=True)
        kc = vc = K = V = None                       # free before the next case
    return {"rows": rows, "mixed": mixed_step(device, dry)}


def mixed_step(device, dry: bool) -> dict:
    """32 decodes + one 980-token prefill chunk in one launch vs the two launched apart."""
    import torch

    from apar_rt.kernels.tree_attention import tree_paged_attention

    gen = torch.Generator().manual_seed(3)
    n_dec, ctx, chunk = (4, 32, 40) if dry else (32, 1024, 980)
    shape = dict(hq=4, hkv=4, d=64) if dry else dict(hq=32, hkv=32, d=128)
    dtype = torch.float32 if dry else torch.float16
    dec = [(ctx, [[True]])] * n_dec
    pre = [(0, _causal(chunk))]
    steps = {name: random_step(gen, seqs, block_size=16, dtype=dtype, device=device, **shape)
             for name, seqs in (("decodes", dec), ("prefill", pre), ("mixed", dec + pre))}
    ms = {}
    for name, st in steps.items():
        args = [st[k] for k in ("q", "k", "v", "k_cache", "v_cache", "block_tables", "context_lens",
                                "query_start", "mask")]
        ms[name] = kernel_ms(lambda: tree_paged_attention(*args, st["scale"]), device)
    return {**{f"{k}_ms": v for k, v in ms.items()}, "x_parts": ms["mixed"] / (ms["decodes"] + ms["prefill"])}


# ---- section 6: the device sampler ----------------------------------------------------------------------

def device_sampler(device, dry: bool) -> dict:
    import numpy as np
    import torch

    from apar_rt.backends.torch_sampler import DeviceSampler
    from apar_rt.core import SamplingParams
    from apar_rt.sampler import SamplingBatch, ranked_top_k, sample
    from apar_rt.testing.sampling import random_case

    ds = DeviceSampler(device)
    rng = np.random.default_rng(0)
    rows_n = token_diff = ok_diff = 0
    probe_err = 0.0
    cases = [dict()] * (20 if dry else 300) + [dict(V=1000 if dry else 32000, R=16 if dry else 256)] * (2 if dry else 6)
    for kw in cases:
        x, rows, batch = random_case(rng, **kw)
        ref = sample(x[rows], batch)
        got = ds.sample(torch.from_numpy(x).to(device), rows, batch)
        rows_n += len(batch)
        ok_diff += int((got.ok != ref.ok).sum())
        token_diff += int((got.tokens != ref.tokens).sum())
        both = ~np.isnan(ref.probes)
        if both.any():
            probe_err = max(probe_err, float(np.abs(got.probes[both] - ref.probes[both]).max()))
    x = torch.randn(64 * 5, 1000 if dry else 32000, device=device)
    x[::4] = x[::4].round()
    topk_equal = bool(np.array_equal(ds.ranked_top_k(x, 10), ranked_top_k(x.cpu().numpy(), 10)))

    R, V = (16, 1000) if dry else (256, 32000)
    logits = torch.randn(R, V, device=device) * 3
    rows = np.arange(R)
    timing = []
    for name, p in (("greedy", SamplingParams()), ("top-k 50", SamplingParams(temperature=1.0, top_k=50)),
                    ("top-p 0.9", SamplingParams(temperature=1.0, top_p=0.9))):
        batch, g = SamplingBatch(), np.random.default_rng(1)
        for _ in range(R):
            batch.add(p, (), g)
        same = bool(np.array_equal(ds.sample(logits, rows, batch).tokens, sample(logits.cpu().numpy(), batch).tokens))
        dev_ms = median_ms(lambda: ds.sample(logits, rows, batch), device, reps=3 if dry else 20)
        host_ms = median_ms(lambda: sample(logits.cpu().numpy(), batch), device, warmup=1, reps=3 if dry else 5)
        timing.append({"case": name, "rows": R, "vocab": V, "device_ms": dev_ms, "host_copy_numpy_ms": host_ms,
                       "x_faster": host_ms / dev_ms, "tokens_equal": same})
        print(f"   sampler {name}: device {dev_ms:.2f} ms, copy+numpy {host_ms:.2f} ms", flush=True)
    return {"rows_checked": rows_n, "token_mismatches": token_diff, "ok_mismatches": ok_diff,
            "max_probe_error": probe_err, "ranked_topk_equal": topk_equal, "timing": timing,
            "all_pass": token_diff == 0 and ok_diff == 0 and probe_err < 1e-5 and topk_equal
            and all(t["tokens_equal"] for t in timing)}


# ---- the table ---------------------------------------------------------------------------------------

def summary(data: dict) -> str:
    s = {k: v for k, v in data["sections"].items()}
    for name in ("oracles", "decode_steps", "attention"):
        s.setdefault(name, {"ok": False, "error": "skipped"})
    lines = []
    bw = s.get("bandwidth", {})
    lines.append(f"GPU: {bw.get('gpu', 'cpu (dry run)')}; copy bandwidth {bw.get('bandwidth_GBps', 0):.0f} GB/s")
    ka = s.get("kernel_accuracy", {})
    for name, r in ka.get("cases", {}).items():
        lines.append(f"kernel vs reference  {name:30s} rel err {r['rel_error']:.1e} (tol {r['tolerance']:.0e}) "
                     f"{'PASS' if r['pass'] else 'FAIL'}")
    if not ka.get("ok", True):
        lines.append(f"kernel vs reference: ERROR {ka.get('error')}")
    orc = s.get("oracles", {})
    if orc.get("ok"):
        lines.append(f"AR greedy == transformers generate: {'PASS' if orc['ar_pass'] else 'FAIL'} {orc['ar_greedy_equal']}")
        lines.append(f"APAR oracle ({orc['apar_forks']} forks): {'PASS' if orc['apar_pass'] else 'FAIL'}")
    else:
        lines.append(f"oracles: ERROR {orc.get('error')}")
    ds = s.get("decode_steps", {})
    if ds.get("ok"):
        lines.append(f"{ds['model']} decode step (ms, median)   graph   eager   floor  x_floor   hf(sdpa)  hf/ours"
                     "  device ops")
        for r in ds["rows"]:
            hf = r.get("hf_step_ms")
            hf_s = f"{hf:8.2f}" if isinstance(hf, float) else f"{str(hf)[:8]:>8s}"
            sp = r.get("x_hf_speedup")
            ops = r.get("device_ops_per_step")
            lines.append(f"  B={r['batch']:<3d} ctx={r['context']:<5d}          {r['step_ms_graph']:7.2f} "
                         f"{r['step_ms_eager']:7.2f} {r.get('floor_ms', 0):7.2f} {r.get('x_floor', 0):7.2f}  "
                         f"{hf_s}  {sp if sp is None else round(sp, 2)}  {'-' if ops is None else ops}")
        e = ds.get("engine", {})
        if e:
            lines.append(f"engine loop (AR greedy) B={e['batch']} prompt {e['prompt']} +{e['new_tokens']}: apar-rt "
                         f"{e['apar_rt_tokens_per_s']:.0f} tok/s, transformers generate {e['hf_tokens_per_s']:.0f} "
                         f"tok/s: x{e['x_hf']:.2f}")
    else:
        lines.append(f"decode steps: ERROR {ds.get('error')}")
    at = s.get("attention", {})
    if at.get("ok"):
        for r in at["rows"]:
            lines.append(f"attention B={r['batch']} ctx={r['context']}: ours {r['ours_ms']:.3f} ms, sdpa "
                         f"{r['sdpa_ms']:.3f} ms, ours/sdpa {r['x_sdpa']:.2f}, floor {r.get('floor_ms', 0):.3f} ms")
            if "tile_sweep_ms" in r:
                lines.append("   tiles: " + ", ".join(f"{k} {v:.3f}" for k, v in r["tile_sweep_ms"].items()))
        m = at["mixed"]
        lines.append(f"mixed step (decodes+chunk) {m['mixed_ms']:.3f} ms vs parts {m['decodes_ms']:.3f}+"
                     f"{m['prefill_ms']:.3f} ms: x{m['x_parts']:.2f}")
    else:
        lines.append(f"attention: ERROR {at.get('error')}")
    sm = s.get("sampler", {})
    if sm.get("ok"):
        lines.append(f"device sampler == numpy reference: {'PASS' if sm['all_pass'] else 'FAIL'} "
                     f"({sm['rows_checked']} rows, {sm['token_mismatches']} token / {sm['ok_mismatches']} ok "
                     f"mismatches, probe err {sm['max_probe_error']:.1e}, ranked top-k "
                     f"{'equal' if sm['ranked_topk_equal'] else 'DIFFERENT'})")
        for t in sm["timing"]:
            lines.append(f"  sample {t['rows']}x{t['vocab']} {t['case']:9s}: device {t['device_ms']:.2f} ms, "
                         f"copy+numpy {t['host_copy_numpy_ms']:.2f} ms: x{t['x_faster']:.1f}")
    elif "sampler" in s:
        lines.append(f"device sampler: ERROR {sm.get('error')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apar_rt.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json (default: %(default)s)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every section on the CPU with tiny sizes (kernels under TRITON_INTERPRET=1)")
    ap.add_argument("--device", default="cuda", help="CUDA device to check (default: %(default)s)")
    ap.add_argument("--skip", nargs="*", default=[], help="section names to skip")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    else:
        from apar_rt.backends.device import resolve_device

        device = resolve_device(args.device)
        if device.type != "cuda":
            print(f"--device {args.device} is not a CUDA device; use --dry-run on a CPU", file=sys.stderr)
            return 2
    check = Check(Path(args.out), args.dry_run)
    sections = [("bandwidth", copy_bandwidth), ("kernel_accuracy", kernel_accuracy), ("oracles", oracles),
                ("attention", attention_vs_sdpa), ("sampler", device_sampler), ("decode_steps", decode_steps)]
    bw = None
    for name, fn in sections:
        if name in args.skip:
            continue
        extra = (bw,) if name in ("decode_steps", "attention") else ()
        res = check.run(name, fn, device, args.dry_run, *extra)
        if name == "bandwidth" and res:
            bw = res["bandwidth_GBps"]
    print("\n" + summary(check.data))
    return 0 if all(sec.get("ok") for sec in check.data["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
