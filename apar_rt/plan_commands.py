"""`apar-rt plan`: what a device holds for a model (attached to the CLI by apar_rt.cli)."""

from __future__ import annotations

import click

from apar_rt import memory_plan as mp


def memory_options(f):
    """The budget flags shared by `plan` and `build --fit`."""
    opts = [
        click.option("--memory-gib", type=float, default=None,
                     help="Device memory in GiB (required for cpu; overrides the table otherwise)."),
        click.option("--kv-cache-fraction", type=float, default=None,
                     help="Share of the memory left after weights and activations that the KV pool takes "
                          "(TensorRT-LLM's kv_cache_free_gpu_mem_fraction; default 0.9, or 1.0 with "
                          "--gpu-memory-utilization)."),
        click.option("--gpu-memory-utilization", type=float, default=None,
                     help="Share of the device's memory the engine takes in all, weights included "
                          "(vLLM's flag; default 1.0)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command("plan")
@click.option("--model", required=True, type=click.Path(exists=True),
              help="Model folder, engine folder (its manifest sets dtype, quantization and limits) or "
                   "a config.json file.")
@click.option("--device", "device_name", type=click.Choice(mp.DEVICE_NAMES), required=True,
              help="Target device (cpu needs --memory-gib).")
@memory_options
@click.option("--dtype", type=click.Choice(list(mp.DTYPE_BYTES)), default=None,
              help="Weights/KV dtype [default: float16; an engine folder's own].")
@click.option("--quantize", type=click.Choice(mp.QUANTIZATIONS), default=None,
              help="Weight-only quantization of the linear layers [default: none; an engine folder's own].")
@click.option("--group-size", type=int, default=mp.DEFAULT_GROUP_SIZE, show_default=True,
              help="Input features per quantization scale.")
@click.option("--block-size", type=int, default=None, help="Tokens per KV block [default: 16].")
@click.option("--max-batch-size", type=int, default=None, help="Most sequences in a step [default: 8].")
@click.option("--max-num-tokens", type=int, default=None, help="Most new tokens in a step [default: 2048].")
@click.option("--max-seq-len", type=int, default=None,
              help="Longest sequence [default: the model's max_position_embeddings].")
@click.option("--context", type=int, default=None,
              help="Tokens per request for the sequences x context counts [default: --max-seq-len].")
@click.option("--apar-branches", type=int, default=mp.DEFAULT_APAR_BRANCHES, show_default=True,
              help="Children per APAR request assumed for the APAR count.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(model, device_name, memory_gib, kv_cache_fraction, gpu_memory_utilization, dtype, quantize,
             group_size, block_size, max_batch_size, max_num_tokens, max_seq_len, context, apar_branches,
             as_json):
    """Weights, activations, KV blocks and the sequences x context a device holds.

    \b
    Examples:
      apar-rt plan --model models/vicuna-7b-v1.5 --device orin-nano-8gb --quantize int4 --max-num-tokens 512
      apar-rt plan --model build_engines/out/tiny-ort --device cpu --memory-gib 4 --json
    """
    from apar_rt.config import ModelLoadError

    given = {"dtype": dtype, "block_size": block_size, "max_batch_size": max_batch_size,
             "max_num_tokens": max_num_tokens, "max_seq_len": max_seq_len}
    kw = {k: v for k, v in given.items() if v is not None}
    if quantize is not None:
        kw["quant"] = mp.QuantSpec(quantize, group_size, mp.default_symmetric(quantize))
    try:
        device = mp.get_device(device_name, memory_gib)
        p = mp.plan_from_folder(model, device, context=context, apar_branches=apar_branches,
                                kv_cache_fraction=kv_cache_fraction,
                                gpu_memory_utilization=gpu_memory_utilization, **kw)
    except (mp.PlanError, ModelLoadError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(p.to_json() if as_json else p.table())
