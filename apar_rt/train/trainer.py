"""Fine-tune a HF Llama checkpoint on APAR-formatted examples.

The examples are the JSONL written by `apar_rt.train.data_format` (see its docstring
for the schema). Each example is tokenized segment by segment
(``add_special_tokens=False``), the pieces are concatenated after one BOS, and a
token is a target exactly when its segment has ``"loss": true`` (BOS never is).
Examples longer than ``max_length`` are cut at the right; one left with no target is
skipped. There is no tree mask: like THUDM/APAR, a child is an ordinary causal example
whose loss starts after its last ``[SplitSop]``.

When the tokenizer lacks ``[SplitMask]``/``[SplitSop]`` they are added as special
tokens and the input embedding and LM head grow to the tokenizer's size (two rows for
a tokenizer the same size as the model), the new rows initialised to the mean of the
old ones.

Output folder: ``config.json``, ``model.safetensors``, ``generation_config.json``,
the tokenizer files, and ``train_log.jsonl`` (one JSON object per logged step:
``step``, ``loss``, ``lr``, ``tokens``, ``elapsed_s``; then a final ``summary`` line).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from apar_rt.apar import CHILD_TOKEN, FORK_TOKEN
from apar_rt.train.data_format import read_examples

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    """Settings of one training run (see `train`)."""

    model: str  # HF checkpoint folder (LlamaForCausalLM)
    data: Sequence[str]  # formatted JSONL files
    output: str  # folder to write the fine-tuned checkpoint to
    tokenizer: str | None = None  # tokenizer folder; default: the model folder
    steps: int | None = None  # optimizer steps; default: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 512
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    log_every: int = 10
    progress: bool = True  # tqdm progress bar


@dataclass
class TrainResult:
    """What a run did."""

    steps: int
    first_loss: float
    final_loss: float
    elapsed_s: float
    tokens: int
    rows_added: int
    output: str
    losses: list[float] = field(default_factory=list)


def ensure_control_tokens(model, tokenizer) -> int:
    """Add [SplitMask]/[SplitSop] to the tokenizer when missing and grow the model to fit.

    Returns:
        How many rows the embedding (and LM head) gained.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in (FORK_TOKEN, CHILD_TOKEN) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model.get_input_embeddings().weight.shape[0] - old


def encode_example(example: dict[str, Any], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where no loss) of one formatted example."""
    ids = [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX]
    for seg in example["segments"]:
        piece = tokenizer(seg["text"], add_special_tokens=False).input_ids
        ids += piece
        labels += piece if seg["loss"] else [IGNORE_INDEX] * len(piece)
    return ids[:max_length], labels[:max_length]


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then group similar lengths (within windows of 50 batches) to cut padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    out: list[list[int]] = []
    window = batch_size * 50
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def load_for_training(model_dir: str, tokenizer_dir: str | None):
    """Load a Llama checkpoint and its tokenizer (fp32) for training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {tokenizer_dir or model_dir!r} needs BOS and EOS tokens")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return model, tok


def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data` and save the result to `cfg.output`.

    Raises:
        ValueError: a bad setting or data file, naming it.
    """
    import torch
    from tqdm import tqdm

    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if not cfg.data:
        raise ValueError("no data file given")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from apar_rt.backends.device import resolve_device

    device = resolve_device(cfg.device, runner="training")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    model, tok = load_for_training(cfg.model, cfg.tokenizer)
    rows_added = ensure_control_tokens(model, tok)
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id

    examples = [ex for path in cfg.data for ex in read_examples(path)]
    encoded = [encode_example(ex, tok, cfg.max_length) for ex in examples]
    encoded = [e for e in encoded if any(label != IGNORE_INDEX for label in e[1])]
    if not encoded:
        raise ValueError(f"no example with a loss target in {list(cfg.data)}")
    lengths = [len(e[0]) for e in encoded]
    per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(per_epoch * cfg.epochs))

    model.to(device)
    model.train()
    model.config.use_cache = False
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    pad = tok.pad_token_id
    schedule: list[list[int]] = []
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="train", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    with open(log_path, "w", encoding="utf-8") as log:
        for step in range(total):
            if not schedule:
                schedule = _batches(lengths, cfg.batch_size, rng)
            batch = [encoded[i] for i in schedule.pop()]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (ids, lab) in enumerate(batch):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                labels[r, : len(lab)] = torch.tensor(lab)
                mask[r, : len(ids)] = 1
            lr = _lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            res = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss = float(res.loss.detach())
            losses.append(loss)
            tokens += int(mask.sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == total - 1:
                row = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "tokens": tokens,
                       "elapsed_s": round(time.perf_counter() - t0, 2)}
                log.write(json.dumps(row) + "\n")
                log.flush()
        bar.close()
        elapsed = time.perf_counter() - t0
        tail = losses[-max(1, min(20, len(losses) // 5)):]
        result = TrainResult(
            steps=total,
            first_loss=losses[0],
            final_loss=sum(tail) / len(tail),
            elapsed_s=round(elapsed, 2),
            tokens=tokens,
            rows_added=rows_added,
            output=str(out),
            losses=losses,
        )
        summary = {k: v for k, v in asdict(result).items() if k != "losses"}
        summary["examples"] = len(encoded)
        summary["config"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(cfg).items()}
        log.write(json.dumps({"summary": summary}) + "\n")

    save_checkpoint(model, tok, out)
    return result


def save_checkpoint(model, tokenizer, out: str | Path) -> None:
    """Save model (safetensors), tokenizer and generation config to `out`."""
    from transformers import GenerationConfig

    out = Path(out)
    model.eval()
    model.config.use_cache = True
    model.to("cpu")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
