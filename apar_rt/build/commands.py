"""The `apar-rt build` command (attached to the CLI by apar_rt.cli)."""

from __future__ import annotations

import sys

import click

from apar_rt.memory_plan import DEVICE_NAMES
from apar_rt.plan_commands import memory_options


def _parse_buckets(ctx, param, value):
    if value is None or value == "":
        return ()
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers (e.g. 1,2,4,8)",
                                 ctx, param) from None


@click.command("build")
@click.option("--model", required=True, type=click.Path(), help="Hugging Face Llama folder to build from.")
@click.option("--output", "-o", "--output-dir", "--output_dir", "output", required=True, type=click.Path(), help="Engine folder to create.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="What the engine folder is built for.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True,
              help="Weights and KV dtype (auto: float32 for onnxruntime, float16 for tensorrt).")
@click.option("--max-batch-size", "--max_batch_size", "max_batch_size", type=int, default=8, show_default=True,
              help="Most sequences (APAR branches included) in one step.")
@click.option("--batch-buckets", callback=_parse_buckets, default=None,
              help="Comma-separated fixed batch sizes, one TensorRT profile each (default: 1,2,4,.. up to "
                   "--max-batch-size; onnxruntime engines run any batch up to the largest).")
@click.option("--max-num-tokens", "--max_num_tokens", "max_num_tokens", type=int, default=2048, show_default=True,
              help="Most new tokens in one step.")
@click.option("--max-seq-len", "--max_seq_len", "max_seq_len", type=int, default=None,
              help="Longest context of one sequence (default: the model's max_position_embeddings).")
@click.option("--block-size", "--tokens_per_block", "block_size", type=int, default=16, show_default=True,
              help="Tokens per KV cache block.")
@click.option("--max-num-blocks", type=int, default=None,
              help="Largest KV pool the engine accepts (default: unlimited for onnxruntime, 4096 for "
                   "tensorrt).")
@click.option("--timing-cache", "--timing_cache", "timing_cache", type=click.Path(dir_okay=False), default=None,
              help="TensorRT timing cache file: read if present, written back after the build.")
@click.option("--plugin", default=None, metavar="python|LIBRARY",
              help="TreePagedAttention TensorRT plugin: `python` (apar-rt's Python IPluginV3) or the path of a "
                   "shared library that registers apar::TreePagedAttention version 1 (default: no plugin; "
                   "TensorRT inlines the ONNX function).")
@click.option("--gpu-targets", callback=lambda c, p, v: tuple(x.strip() for x in v.split(",") if x.strip())
              if v else (), default=None, metavar="CC[,CC...]",
              help="TensorRT-RTX: compute capabilities the plan runs on (default 8.6,8.9,12.0; 7.5 for "
                   "Turing). Full TensorRT builds for the GPU it runs on.")
@click.option("--max-draft-len", type=int, default=None,
              help="Most draft tokens per sequence in a decode step (TensorRT decode profiles; default: 63 "
                   "when the model has Medusa heads, else 0).")
@click.option("--max-prefill-batch", type=int, default=4, show_default=True,
              help="Most prefilling sequences in one TensorRT run (prefill profiles exist up to this batch).")
@click.option("--workspace", "workspace_gib", type=float, default=None,
              help="TensorRT workspace limit in GiB.")
@click.option("--medusa/--no-medusa", default=None,
              help="Export the Medusa heads in MODEL/medusa as a medusa_logits output "
                   "(default: when present).")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Weight-only quantization of the linear layers (onnxruntime: MatMulNBits; tensorrt: blocked "
                   "DequantizeLinear). Embeddings, norms and the LM head stay in --dtype.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input features per quantization scale (a power of two >= 16 dividing the hidden and "
                   "intermediate sizes).")
@click.option("--symmetric/--asymmetric", default=None,
              help="Symmetric scales, or scales and zero points per group [default: measured best on "
                   "onnxruntime: int8 symmetric, int4 asymmetric; tensorrt: symmetric only].")
@click.option("--quantize-lm-head", is_flag=True,
              help="Also quantize the LM head (and the Medusa heads' vocabulary projections).")
@click.option("--fit", "fit", type=click.Choice(DEVICE_NAMES), default=None,
              help="Set --max-num-blocks to the KV pool this device holds (the `apar-rt plan` arithmetic).")
@memory_options
@click.option("--check", is_flag=True,
              help="Compare the engine with the torch reference and report the largest difference "
                   "(polygraphy run --onnxrt / --trt).")
@click.option("--dry-run", is_flag=True,
              help="TensorRT: print the profiles' device-memory estimate (weights, activations at the largest "
                   "profile, KV pool) and stop; MODEL may hold only a config.json.")
@click.option("--force", is_flag=True, help="Overwrite an existing engine folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def build(model, output, backend, dtype, max_batch_size, batch_buckets, max_num_tokens, max_seq_len,
          block_size, max_num_blocks, timing_cache, plugin, gpu_targets, max_draft_len, max_prefill_batch,
          workspace_gib, medusa, quantize, group_size, symmetric, quantize_lm_head, fit, memory_gib,
          kv_cache_fraction, gpu_memory_utilization, check, dry_run, force, quiet):
    """Build an engine folder (model.onnx, TensorRT engines, manifest.json) from a checkpoint.

    trtllm-build's spellings are accepted where they mean the same: --output_dir, --max_batch_size,
    --max_num_tokens, --max_seq_len, --tokens_per_block, --timing_cache.

    \b
    Examples:
      apar-rt build --model samples/models/apar-tiny --output build_engines/out/tiny-ort --check
      apar-rt build --model models/vicuna-7b-v1.5 --output out/vicuna-trt --backend tensorrt \\
          --dtype float16 --max-batch-size 16 --timing-cache out/timing.cache
      apar-rt generate --engine build_engines/out/tiny-ort --backend onnxruntime "Give me 3 tips."
    """
    from apar_rt.build.builder import BuildError, BuildOptions
    from apar_rt.build.builder import build as run_build
    from apar_rt.config import ModelLoadError
    from apar_rt.trt.library import TensorRTUnavailable
    from apar_rt.trt.plugin import PluginError

    opts = BuildOptions(model=model, output=output, backend=backend, dtype=dtype,
                        max_batch_size=max_batch_size, batch_buckets=batch_buckets,
                        max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                        block_size=block_size, max_num_blocks=max_num_blocks, timing_cache=timing_cache,
                        plugin=plugin, gpu_targets=gpu_targets, max_draft_len=max_draft_len,
                        max_prefill_batch=max_prefill_batch, workspace_gib=workspace_gib, medusa=medusa,
                        quantize=quantize, group_size=group_size, symmetric=symmetric,
                        quantize_lm_head=quantize_lm_head, fit=fit, memory_gib=memory_gib,
                        kv_cache_fraction=kv_cache_fraction,
                        gpu_memory_utilization=gpu_memory_utilization, check=check, dry_run=dry_run,
                        force=force)
    try:
        result = run_build(opts, progress=not quiet, log=lambda m: click.echo(m, err=True))
    except (BuildError, ModelLoadError, TensorRTUnavailable, PluginError) as e:
        raise click.ClickException(str(e)) from None
    if result.manifest is None:
        click.echo(f"dry run: nothing written to {result.output}")
        return
    click.echo(str(result.output))
    if result.check is not None and not result.check.passed:
        click.echo("error: the engine does not match the torch reference within tolerance", err=True)
        sys.exit(1)
