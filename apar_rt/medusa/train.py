"""Self-distillation of Medusa heads: the model writes its own greedy answers (APAR branches
included), and head h learns to predict the token h + 2 ahead of each position in them.

torch is imported when training runs, not with this module (the CLI reads its defaults here)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Sequence

# new tokens the model writes per prompt for the distillation data (`apar-rt train-medusa --max-tokens`):
# heads distilled on 128-token answers drafted worse late in the demo's longer answers (a 4-deep chain
# took 1,073 steps for the held-out prompts against 970 with heads distilled on 200-token answers)
DISTILL_MAX_TOKENS = 200

# The learning rate over the steps (`apar-rt train-medusa --lr-scheduler-type`, as HF Trainer and
# Medusa's own training spell it): "cosine" rises linearly over the first `warmup_ratio` of the
# steps, then decays to zero on a half cosine; "constant" stays at --lr. The demo's heads were
# undertrained: top-1 of heads 1..4 on the held-out prompts' answers [0.891, 0.831, 0.768, 0.709]
# after 2,500 constant steps of batch 64 (lr 0.002), [0.926, 0.873, 0.844, 0.795] after 10,000,
# [0.945, 0.905, 0.870, 0.829] after 10,000 cosine ones, and [0.955, 0.921, 0.902, 0.869] after
# 10,000 cosine steps of batch 256 at lr 0.003 (samples/train_demo.py's recipe).
LR_SCHEDULERS = ("cosine", "constant")
WARMUP_RATIO = 0.03


def lr_at(step: int, steps: int, lr: float, scheduler: str = "cosine", warmup_ratio: float = WARMUP_RATIO) -> float:
    """The learning rate of step `step` (0-based) of `steps`."""
    if scheduler == "constant":
        return lr
    if scheduler != "cosine":
        raise ValueError(f"lr scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {scheduler!r}")
    warm = max(1, round(warmup_ratio * steps))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _contexts(model_dir: str, prompts: Sequence[str], max_tokens: int, mode: str,
              raw: bool) -> list[tuple[int, list[int]]]:
    """(prompt length, full token context) of every branch the model writes for the prompts."""
    from apar_rt import LLM, SamplingParams

    llm = LLM(model_dir, mode=mode, raw=raw, dtype="float32", device="cpu", num_blocks=4096)
    out = []
    for o in llm.generate(list(prompts), SamplingParams(max_tokens=max_tokens)):
        if o.error:
            continue
        branches = {b["id"]: b for b in o.branches}
        for b in o.branches:
            prefix, node = [], b
            while node["parent"] is not None:
                parent = branches[node["parent"]]
                prefix = parent["token_ids"][:node["fork_index"] + 1] + prefix
                node = parent
            ctx = list(o.prompt_token_ids) + prefix + b["token_ids"]
            out.append((len(o.prompt_token_ids), ctx))
    return out


def _hidden(model, ids: list[int]):
    """Final-norm hidden states of one whole sequence (a single prefill with an empty cache)."""
    import torch

    T = len(ids)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    cfg = model.config
    empty = torch.zeros(1, 1, cfg.num_key_value_heads, cfg.head_dim)
    caches = [empty] * cfg.num_hidden_layers
    with torch.no_grad():
        h, _, _ = model.hidden_states(i32(ids), i32(range(T)), caches, caches, i32([[0]]), i32([0]), i32([0, T]),
                                      torch.tril(torch.ones(T, T, dtype=torch.bool)))
    return h


def train_medusa(model_dir: str, prompts: Sequence[str], *, output: str | None = None, num_heads: int = 4,
                 num_layers: int = 1, steps: int = 300, lr: float = 1e-3, batch: int = 16,
                 max_tokens: int = DISTILL_MAX_TOKENS, lr_scheduler: str = "cosine",
                 warmup_ratio: float = WARMUP_RATIO, epochs: float | None = None,
                 mode: str = "apar", raw: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Train heads on the model's own outputs and save them to `output` (default `<model>/medusa`).

    mode: "apar" (every branch's context), "ar", or "both" (heads that serve either mode).
    lr_scheduler, warmup_ratio: the learning rate over the steps (`lr_at`).
    epochs: passes over the distillation positions; sets the steps (ceil(epochs * positions /
    positions a step samples, min(batch, positions))) in place of `steps`. The summary's `epochs` is the passes made either way.

    Returns a summary with the loss at the start and end and per-head top-1 accuracy.
    """
    lr_at(0, steps, lr, lr_scheduler, warmup_ratio)   # an unknown scheduler fails before any work
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from apar_rt.medusa.heads import HEADS_DIRNAME, MedusaHeads
    from apar_rt.model.weights import load_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, cfg = load_model(model_dir)
    modes = ("apar", "ar") if mode == "both" else (mode,)
    data = [c for m in modes for c in _contexts(model_dir, prompts, max_tokens, m, raw)]
    if not data:
        raise ValueError("no training data: every prompt failed to generate")
    feats, targets = [], []   # per position: hidden, and the tokens 2..num_heads+1 ahead (-100 past the end)
    for n_prompt, ids in data:
        h = _hidden(model, ids)
        start = max(n_prompt - 1, 0)
        for t in range(start, len(ids) - 2):
            feats.append(h[t])
            targets.append([ids[t + k + 2] if t + k + 2 < len(ids) else -100 for k in range(num_heads)])
    X = torch.stack(feats)
    Y = torch.tensor(targets)
    per_step = min(batch, len(X))   # positions a step samples
    if epochs is not None:
        steps = max(1, math.ceil(epochs * len(X) / per_step))
    heads = MedusaHeads.init_from_lm_head(model.lm_head.weight.detach().float(), num_heads, num_layers)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    log = []
    order = list(range(len(X)))
    bar = tqdm(range(steps), desc="train-medusa", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, lr_scheduler, warmup_ratio)
        idx = torch.tensor(rng.sample(order, per_step))
        logits = heads(X[idx])                                           # [b, H, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y[idx].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append(loss.item())
        bar.set_postfix(loss=f"{log[-1]:.3f}")
    with torch.no_grad():
        pred = heads(X).argmax(-1)
        valid = Y != -100
        acc = [float(((pred[:, k] == Y[:, k]) & valid[:, k]).sum() / valid[:, k].sum().clamp_min(1))
               for k in range(num_heads)]
    out_dir = Path(output) if output else Path(model_dir) / HEADS_DIRNAME
    heads.save(out_dir)
    summary = {"positions": len(X), "sequences": len(data), "first_loss": log[0], "last_loss": log[-1],
               "head_top1_accuracy": acc, "steps": steps, "batch": batch, "epochs": steps * per_step / len(X),
               "lr": lr, "lr_scheduler": lr_scheduler, "output": str(out_dir)}
    (out_dir / "training_log.json").write_text(json.dumps({"summary": summary, "loss": log}, indent=1))
    return summary
