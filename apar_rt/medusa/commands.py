"""`apar-rt train-medusa`: self-distil Medusa heads for a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from apar_rt.medusa.train import DISTILL_MAX_TOKENS, LR_SCHEDULERS, WARMUP_RATIO
from apar_rt.prompts import read_prompts


@click.command("train-medusa")
@click.option("--model", type=click.Path(exists=True, file_okay=False), required=True, help="HF model folder.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Training prompts: JSON lines with a 'prompt' field, or one prompt per line.")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Where to save the heads (default: MODEL/medusa).")
@click.option("--num-heads", type=click.IntRange(1, 8), default=4, show_default=True)
@click.option("--num-layers", type=click.IntRange(1, 4), default=1, show_default=True,
              help="ResBlocks per head.")
@click.option("--steps", type=click.IntRange(1), default=600, show_default=True)
@click.option("--num-train-epochs", "epochs", type=click.FloatRange(0.0, min_open=True), default=None,
              help="Passes over the distillation positions: sets the steps in place of --steps. The demo's heads "
                   "needed about 25 (samples/train_demo.py: 10,000 steps of batch 256 over 102,713 positions); "
                   "600 steps of 32 are a fraction of one pass there.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--lr-scheduler-type", "lr_scheduler", type=click.Choice(LR_SCHEDULERS), default="cosine",
              show_default=True,
              help="Learning rate over the steps: cosine (linear warmup over --warmup-ratio of them, then a "
                   "half cosine to zero) or constant.")
@click.option("--warmup-ratio", type=click.FloatRange(0.0, 1.0, max_open=True), default=WARMUP_RATIO,
              show_default=True, help="With --lr-scheduler-type cosine: the share of steps that warm up.")
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=DISTILL_MAX_TOKENS, show_default=True,
              help="New tokens the model writes per prompt for the distillation data.")
@click.option("--mode", type=click.Choice(["both", "apar", "ar"]), default="both", show_default=True,
              help="Decode mode(s) of the distillation data (apar includes every branch's context).")
@click.option("--raw", is_flag=True, help="Feed prompts with no chat template.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_medusa(model, prompts_file, output, num_heads, num_layers, steps, epochs, lr, lr_scheduler, warmup_ratio,
                 batch, max_tokens, mode, raw, seed):
    """Train Medusa-1 heads for MODEL on its own greedy outputs (self-distillation)."""
    from apar_rt.medusa.train import train_medusa as run

    try:
        prompts = read_prompts(prompts_file)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--prompts") from None
    summary = run(model, prompts, output=output, num_heads=num_heads, num_layers=num_layers,
                  steps=steps, epochs=epochs, lr=lr, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
                  batch=batch, max_tokens=max_tokens, mode=mode, raw=raw, seed=seed)
    click.echo(json.dumps(summary, indent=1))
