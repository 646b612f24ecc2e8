"""The `apar-rt` command line."""

from __future__ import annotations

import json
import sys

import click

from apar_rt import __version__
from apar_rt.medusa.tree import DEFAULT_TREE, preset_names

_TREE_PRESETS = ", ".join(preset_names())   # the --medusa-tree presets, for the help texts

_SAMPLING_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
                   "top_k": "--top-k", "logit_bias": "--logit-bias", "stop": "--stop", "seed": "--seed"}


def _parse_logit_bias(ctx, param, values):
    out = {}
    for item in values:
        tok, sep, val = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(tok)] = float(val)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not ID=VALUE (for example 32000=5.0)", ctx, param) from None
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="apar-rt")
def main() -> None:
    """apar-rt: serve Llama/Vicuna models with APAR (auto-parallel auto-regressive) decoding."""


def engine_options(f):
    """Flags shared by every command that runs the engine."""
    opts = [
        click.option("--model", "model", type=click.Path(), required=True,
                     help="Hugging Face model folder (config.json, safetensors, tokenizer)."),
        click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
                     show_default=True, help="Backend that runs the model."),
        click.option("--mode", type=click.Choice(["apar", "ar"]), default="apar", show_default=True,
                     help="apar forks on [Fork]; ar bans the control tokens (the baseline)."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                     show_default=True, help="Weight and KV dtype (auto: float16 on GPU, float32 on CPU)."),
        click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if present)."),
        click.option("--num-blocks", type=int, default=512, show_default=True,
                     help="KV blocks in the pool (block 0 is reserved)."),
        click.option("--block-size", type=int, default=16, show_default=True, help="Tokens per KV block."),
        click.option("--gpu-memory-utilization", type=float, default=None,
                     help="Size the KV pool (instead of --num-blocks) so that the engine takes this share of "
                          "the device's memory in all, weights included (vLLM's flag; on the CPU, a share "
                          "of --memory-gib)."),
        click.option("--kv-cache-fraction", type=float, default=None,
                     help="Size the KV pool (instead of --num-blocks) as this share of the memory left after "
                          "weights and activations (TensorRT-LLM's kv_cache_free_gpu_mem_fraction)."),
        click.option("--memory-gib", type=float, default=None,
                     help="The memory the two flags above share out, in GiB (required on the CPU; default on "
                          "a GPU: its total memory)."),
        click.option("--max-num-seqs", type=int, default=64, show_default=True,
                     help="Most sequences (APAR branches included) in one step."),
        click.option("--max-num-tokens", "--max-num-batched-tokens", "max_num_tokens", type=int, default=2048,
                     show_default=True,
                     help="Most new tokens in one packed step (prefill chunks + decodes); vLLM's "
                          "--max-num-batched-tokens."),
        click.option("--long-prefill-token-threshold", type=click.IntRange(min=0), default=None,
                     help="Most prompt tokens of one request in one step: a longer prompt prefills in chunks "
                          "of this size (vLLM's flag; 0: no cap but --max-num-tokens). Default: the backend's "
                          "choice: 256 for onnxruntime on the CPU, whose long chunks cost their square; no cap "
                          "elsewhere."),
        click.option("--max-model-len", type=int, default=None,
                     help="Length cap per request (default: the model's max_position_embeddings)."),
        click.option("--max-depth", type=int, default=2, show_default=True,
                     help="[Fork] is banned in branches this deep (the root is depth 0)."),
        click.option("--text-join", type=click.Choice(["inplace", "reference"]), default="inplace",
                     show_default=True,
                     help="Text recovery: each piece decoded in place, or THUDM/APAR's newline fix-ups "
                          "(for checkpoints trained on its data, e.g. THUDM/apar-7b)."),
        click.option("--max-waiting", type=int, default=1024, show_default=True,
                     help="Most requests waiting for admission; past it the servers answer 429 (0: no limit). "
                          "Requests already admitted are never dropped."),
        click.option("--ban-fork-when-full", is_flag=True,
                     help="Ban [Fork] while a step already holds --max-num-seqs sequences (as THUDM/APAR)."),
        click.option("--medusa", is_flag=True,
                     help="Verify Medusa draft trees in the loop, with the heads in MODEL/medusa."),
        click.option("--medusa-heads", type=click.Path(), default=None,
                     help="Medusa heads folder (implies --medusa; default: MODEL/medusa)."),
        click.option("--medusa-tree", default=None, metavar="NAME|FILE",
                     help=f"Draft tree: a preset ({_TREE_PRESETS}) or a JSON file of paths "
                          f"(default: {DEFAULT_TREE})."),
        click.option("--acceptance", type=click.Choice(["typical", "greedy"]), default="typical",
                     show_default=True,
                     help="Drafts for sampled requests: typical acceptance, or greedy (no drafts when "
                          "temperature > 0). Greedy requests are always verified losslessly."),
        click.option("--speculative-disable-by-batch-size", type=click.IntRange(min=1), default=None,
                     help="With --medusa: no draft trees in a step after one that ran at least this many "
                          "sequences (APAR branches count one each), since a compute-bound step pays for a "
                          "tree's rows (vLLM's flag; default: no limit). Greedy output is the same either way."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _engine_kwargs(kw: dict) -> dict:
    out = {k: kw[k] for k in ("num_blocks", "block_size", "max_num_seqs", "max_num_tokens", "max_model_len",
                              "max_depth", "mode", "acceptance", "ban_fork_when_full", "text_join", "max_waiting",
                              "long_prefill_token_threshold", "speculative_disable_by_batch_size")}
    medusa = kw.get("medusa_heads") or kw.get("medusa") or bool(kw.get("medusa_tree"))
    if medusa:
        out["medusa"] = medusa
        out["medusa_tree"] = kw.get("medusa_tree")
    return out


def _fit_kv_pool(ctx, path: str, backend: str, device: str | None, dtype: str, kw: dict) -> None:
    """--gpu-memory-utilization / --kv-cache-fraction (with --memory-gib): set kw["num_blocks"] from
    the memory plan (apar_rt.memory_plan, the one place that does the arithmetic)."""
    from click.core import ParameterSource

    util, frac, gib = kw.pop("gpu_memory_utilization"), kw.pop("kv_cache_fraction"), kw.pop("memory_gib")
    if util is None and frac is None:
        if gib is not None:
            raise click.UsageError("--memory-gib applies with --gpu-memory-utilization or --kv-cache-fraction")
        return
    if ctx.get_parameter_source("num_blocks") != ParameterSource.DEFAULT:
        raise click.UsageError("--num-blocks sizes the KV pool itself; give it or --gpu-memory-utilization / "
                               "--kv-cache-fraction, not both")
    from apar_rt import memory_plan as mp

    gpu = (device or "").startswith("cuda") or backend == "tensorrt"
    if device is None and backend == "torch":
        try:
            import torch
            gpu = torch.cuda.is_available()
        except ImportError:
            pass
    if not gpu and gib is None:
        raise click.UsageError("on the CPU, --gpu-memory-utilization and --kv-cache-fraction are shares of "
                               "--memory-gib N (the memory apar-rt may use); give it")
    try:
        if gpu and gib is None:
            import torch

            index = int(device.partition(":")[2] or 0) if device else 0
            props = torch.cuda.get_device_properties(index)
            dev = mp.Device(f"cuda:{index}", props.total_memory, 0, False, props.name)
        else:
            dev = mp.get_device(mp.CPU_DEVICE, gib) if not gpu else \
                mp.Device("cuda", int(gib * mp.GIB), 0, False, f"GPU with {gib:g} GiB")
        shape = {k: v for k, v in (("block_size", kw.get("block_size")), ("max_batch_size", kw.get("max_num_seqs")),
                                   ("max_num_tokens", kw.get("max_num_tokens"))) if v is not None}
        from apar_rt.build.manifest import is_engine_dir

        if not is_engine_dir(path):     # an engine folder's own dtype comes from its manifest
            shape["dtype"] = dtype if dtype != "auto" else ("float16" if gpu else "float32")
        plan = mp.plan_from_folder(path, dev, kv_cache_fraction=frac, gpu_memory_utilization=util, **shape)
    except ValueError as e:   # PlanError: the numbers that do not fit
        raise click.BadParameter(str(e), param_hint="--gpu-memory-utilization/--kv-cache-fraction") from None
    kw["num_blocks"] = plan.num_blocks
    click.echo(f"KV pool: {plan.num_blocks} blocks of {plan.block_size} tokens ({plan.kv_pool_bytes / mp.GIB:.2f} "
               f"GiB; {dev.description})", err=True)


def _fail_on_value_error(e: ValueError) -> None:
    msg = str(e)
    for field, flag in _SAMPLING_FLAGS.items():
        if msg.startswith(field):
            raise click.BadParameter(msg, param_hint=flag)
    if "Medusa" in msg or msg.startswith("tree "):
        raise click.BadParameter(msg, param_hint="--medusa-tree/--medusa-heads")
    for flag in ("num_blocks", "block_size", "max_num_seqs", "max_num_tokens", "max_depth", "mode", "watermark"):
        if msg.startswith(flag):
            raise click.BadParameter(msg, param_hint="--" + flag.replace("_", "-"))
    raise click.ClickException(msg)


def _model_or_engine(f):
    """--model (from engine_options) becomes optional, and --engine DIR its alternative."""
    f = click.option("--engine", "engine_dir", type=click.Path(), default=None,
                     help="Engine folder from `apar-rt build` (instead of --model; its manifest's backend is "
                          "used unless --backend is given).")(f)
    for p in getattr(f, "__click_params__", ()):
        if p.name == "model":
            p.required = False
            p.help = "Hugging Face model folder (or give --engine)."
    return f


def _engine_dir_defaults(ctx, engine_dir: str, backend: str, kw: dict) -> str:
    """With --engine: the manifest's backend and limits stand in for flags left at their defaults."""
    from click.core import ParameterSource

    from apar_rt.build.manifest import EngineLoadError, read_manifest

    defaulted = lambda name: ctx.get_parameter_source(name) == ParameterSource.DEFAULT  # noqa: E731
    for name in ("block_size", "max_num_seqs", "max_num_tokens"):
        if defaulted(name):
            kw[name] = None          # engine_settings fills these in from the manifest
    if defaulted("backend"):
        try:
            backend = read_manifest(engine_dir).backend
        except EngineLoadError as e:
            raise click.ClickException(str(e)) from None
    return backend


@main.command()
@_model_or_engine
@engine_options
@click.option("--max-tokens", type=int, default=256, show_default=True,
              help="Output tokens per request: the first N new tokens of the APAR tree in reading order "
                   "(the order of the final text; forced [Child] tokens count). Branches that would write "
                   "past that point stop, so greedy output does not depend on load.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables.")
@click.option("--seed", type=int, default=None,
              help="Per-request RNG seed for sampling (each APAR branch draws from its own RNG, seeded by "
                   "this and its place in the tree: the same draws under any load).")
@click.option("--logit-bias", multiple=True, callback=_parse_logit_bias, metavar="ID=VALUE",
              help="Add VALUE to token ID's logit (repeatable), OpenAI style.")
@click.option("--stop", multiple=True, help="Stop string; a branch whose text contains it ends (repeatable).")
@click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Extra end token id (repeatable).")
@click.option("--raw", is_flag=True, help="Feed prompts as they are, with no chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt per line.")
@click.argument("prompts", nargs=-1, required=True)
@click.pass_context
def generate(ctx, prompts, as_json, raw, max_tokens, temperature, top_p, top_k, seed, logit_bias, stop,
             stop_token_ids, model, engine_dir, backend, dtype, device, **kw):
    """Generate for one or more PROMPTS with APAR (or AR) decoding.

    \b
    Example:
      apar-rt generate --model samples/models/apar-tiny "Give me 3 tips for better sleep."
      apar-rt generate --engine build_engines/out/apar-tiny-ort "Give me 3 tips for better sleep."
    """
    if (model is None) == (engine_dir is None):
        raise click.UsageError("give exactly one of --model DIR or --engine DIR")
    if engine_dir is not None:
        backend = _engine_dir_defaults(ctx, engine_dir, backend, kw)
        model = engine_dir
    _fit_kv_pool(ctx, model, backend, device, dtype, kw)
    from apar_rt.config import ModelLoadError
    from apar_rt.core import SamplingParams
    from apar_rt.backends import BackendUnavailable

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, logit_bias=logit_bias, stop=stop, stop_token_ids=stop_token_ids)
    except ValueError as e:
        _fail_on_value_error(e)
    try:
        from apar_rt.llm import LLM
        llm = LLM(model, backend=backend, dtype=dtype, device=device, raw=raw, **_engine_kwargs(kw))
    except (ModelLoadError, BackendUnavailable) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:
        _fail_on_value_error(e)
    outputs = llm.generate(list(prompts), params)
    failed = 0
    for o in outputs:
        if o.error:
            failed += 1
            click.echo(f"error: prompt {o.prompt[:40]!r}: {o.error}", err=True)
        if as_json:
            click.echo(json.dumps(o.to_json(), ensure_ascii=False))
        elif not o.error:
            click.echo(o.text)
            s = o.stats
            medusa = (f", {s['accepted_tokens_per_step']:.2f} tokens/step accepted"
                      if llm.engine.verifier is not None else "")
            click.echo(f"[{s['generated_tokens']} tokens in {s['decode_steps']} steps, {s['forks']} forks, "
                       f"peak {s['peak_kv_blocks']} KV blocks{medusa}]", err=True)
    if failed:
        sys.exit(1)


def _positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers, or BadParameter naming `flag`."""
    try:
        values = tuple(int(x) for x in text.split(","))
        if any(v < 1 for v in values):
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of positive integers", param_hint=flag) from None
    return values


@main.group()
def bench() -> None:
    """Benchmarks (medians of side-by-side runs; not tests)."""


@bench.command("generate")
@click.option("--model", type=click.Path(exists=True, file_okay=False), required=True, help="HF model folder.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="New tokens per request (EOS ignored).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs per side, alternating; each side's median is shown. With --peer onnxruntime-genai "
                   "each ratio is the median of the rounds' ratios (the --prompts runs take as many rounds, "
                   "each side running the whole set back to back).")
@click.option("--mode", type=click.Choice(["ar", "apar"]), default="ar", show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
@click.option("--engine", "engine_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Run apar-rt's side on this engine folder of the same model (e.g. onnxruntime).")
@click.option("--peer", type=click.Choice(["transformers", "onnxruntime-genai"]), default="transformers",
              show_default=True,
              help="The engine to compare with. onnxruntime-genai: apar-rt's onnxruntime engine against the "
                   "model onnxruntime-genai's own builder makes from MODEL (fp32, cpu): AR tokens/s, the median "
                   "decode step (ms per output token) and, with --prompts, APAR requests/s against the peer's AR "
                   "(install: pip install onnxruntime-genai).")
@click.option("--peer-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the peer's built model here (reused when present; default: a temporary folder).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --peer onnxruntime-genai: also time this prompt set (JSONL, e.g. "
                   "samples/prompts/heldout.jsonl): apar-rt APAR (EOS honoured) against the peer's AR decoding "
                   "each prompt to the length of apar-rt's AR answer (the peer cannot ban [Fork], so its own "
                   "greedy AR stops after the skeleton; that figure is in --json too), each engine serving "
                   "B clients (B: each of --batch-sizes) as it can: apar-rt keeps B requests in flight "
                   "(continuous batching), the peer runs waves of B (its CPU batching is static); the 'waves' "
                   "column is apar-rt's ratio in the peer's waves. A line under each row tells where "
                   "apar-rt's in-flight steps spend their time (one more pass, untimed): the forward, the "
                   "Medusa heads, the engine.")
@click.option("--apar-max-tokens", type=int, default=256, show_default=True,
              help="max_tokens per request of the --prompts runs.")
@click.option("--apar-max-num-seqs", type=click.IntRange(min=1), default=None,
              help="max_num_seqs of apar-rt's APAR runs on --prompts (every branch takes a seat; default: "
                   "the engine's --max-batch-size, as a server runs it). With no more seats than --batch-sizes, "
                   "each request's fair share is one seat and none can fork.")
@click.option("--apar-medusa-tree", default=None, metavar="NAME|FILE",
              help="apar-rt's APAR runs on --prompts also verify this Medusa draft tree (a preset: "
                   f"{_TREE_PRESETS}, or a JSON file) with the engine's heads (an engine built here takes "
                   "MODEL/medusa). Greedy answers are the same; the steps are fewer and larger.")
@click.option("--apar-speculative-disable-by-batch-size", "apar_spec_limit", type=click.IntRange(min=1),
              default=None,
              help="With --apar-medusa-tree: no draft tree in a step after one that ran at least this many "
                   "sequences (every APAR branch counts), as `apar-rt serve --speculative-disable-by-batch-size` "
                   "runs (default: trees in every step). The medusa column then reads TREE@N.")
@click.option("--input-len", type=click.IntRange(min=1), default=None,
              help="With --peer onnxruntime-genai: prompt tokens per request of the AR rows (the built-in "
                   "prompts repeated and cut; default: the built-in prompts, about 40 tokens).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_generate_cmd(model, batch_sizes, max_tokens, repeats, mode, threads, engine_dir, peer, peer_dir,
                       prompts_file, apar_max_tokens, apar_max_num_seqs, apar_medusa_tree, apar_spec_limit, input_len,
                       as_json):
    """tokens/s of apar-rt generate against a peer engine (transformers or onnxruntime-genai), side by side.

    \b
    Examples:
      apar-rt bench generate --model samples/models/apar-tiny --batch-sizes 1,8,32
      apar-rt bench generate --model samples/models/apar-tiny --peer onnxruntime-genai --threads 1 \\
          --batch-sizes 1,8,32 --prompts samples/prompts/heldout.jsonl
    """
    sizes = _positive_ints(batch_sizes, "--batch-sizes")
    if peer == "onnxruntime-genai":
        from apar_rt.bench.peer import (PeerUnavailable, apar_seats, bench_peer, check_apar_medusa,
                                        format_rows as peer_rows)

        if mode != "ar":
            raise click.BadParameter("with --peer onnxruntime-genai the tokens/s rows are AR (the peer has no "
                                     "APAR); APAR is timed on --prompts", param_hint="--mode")
        if input_len is not None:
            from apar_rt.config import ModelConfig

            limit = ModelConfig.from_dir(model).max_position_embeddings
            if input_len + max_tokens > limit:
                raise click.BadParameter(f"{input_len} prompt tokens + --max-tokens {max_tokens} exceed the "
                                         f"model's {limit} positions", param_hint="--input-len")
        try:   # refused before anything is built or run
            apar_seats(engine_dir, apar_max_num_seqs, sizes)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--apar-max-num-seqs") from None
        if apar_spec_limit is not None and apar_medusa_tree is None:
            raise click.BadParameter("--apar-speculative-disable-by-batch-size needs --apar-medusa-tree",
                                     param_hint="--apar-speculative-disable-by-batch-size")
        if apar_medusa_tree is not None:
            if not prompts_file:
                raise click.BadParameter("--apar-medusa-tree applies to the APAR runs, which need --prompts",
                                         param_hint="--apar-medusa-tree")
            try:
                check_apar_medusa(apar_medusa_tree, engine_dir, model)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--apar-medusa-tree") from None
        try:
            rows = bench_peer(model, engine=engine_dir, peer_dir=peer_dir, batch_sizes=sizes,
                              max_tokens=max_tokens, repeats=repeats, threads=threads, prompts_file=prompts_file,
                              apar_max_tokens=apar_max_tokens, input_len=input_len,
                              apar_max_num_seqs=apar_max_num_seqs, apar_medusa_tree=apar_medusa_tree,
                              apar_speculative_disable_by_batch_size=apar_spec_limit,
                              log=lambda m: click.echo(m, err=True))
        except PeerUnavailable as e:
            raise click.ClickException(str(e)) from None
        click.echo(json.dumps(rows, indent=1) if as_json else peer_rows(rows))
        return
    if prompts_file:
        raise click.BadParameter("--prompts needs --peer onnxruntime-genai", param_hint="--prompts")
    if input_len is not None:
        raise click.BadParameter("--input-len needs --peer onnxruntime-genai", param_hint="--input-len")
    if apar_max_num_seqs is not None:
        raise click.BadParameter("--apar-max-num-seqs needs --peer onnxruntime-genai",
                                 param_hint="--apar-max-num-seqs")
    if apar_medusa_tree is not None:
        raise click.BadParameter("--apar-medusa-tree needs --peer onnxruntime-genai", param_hint="--apar-medusa-tree")
    if apar_spec_limit is not None:
        raise click.BadParameter("--apar-speculative-disable-by-batch-size needs --peer onnxruntime-genai",
                                 param_hint="--apar-speculative-disable-by-batch-size")
    from apar_rt.bench.generate import bench_generate, format_rows

    rows = bench_generate(model, sizes, max_tokens, repeats, mode=mode, threads=threads, engine=engine_dir)
    click.echo(json.dumps(rows, indent=1) if as_json else format_rows(rows))


@bench.command("overhead")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default="samples/models/apar-tiny",
              show_default=True, help="Model or engine folder whose tokenizer and vocabulary are used.")
@click.option("--seqs", default="1,32,256", show_default=True, help="Running sequences (comma-separated).")
@click.option("--contexts", default="128,1024,4096", show_default=True,
              help="Context tokens per sequence (comma-separated).")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed decode steps per configuration and round.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds: the contexts of one (seqs, variant) take turns, --steps steps each, this many "
                   "times; a row is the median (and mean, and least) of all its steps.")
@click.option("--vocab", type=int, default=None, help="Logits width (default: the model's vocabulary).")
@click.option("--stop", "stops", multiple=True,
              help="Stop string of the stop-string variants (repeatable; default: '\\nUser:' and '</s>').")
@click.option("--stream-interval", type=click.IntRange(min=1), default=1, show_default=True,
              help="Streaming rows run each request's streamer after every N-th step, the requests staggered "
                   "(as `apar-rt serve --stream-interval N`).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_overhead_cmd(model, seqs, contexts, steps, repeats, vocab, stops, stream_interval, as_json):
    """The engine's own milliseconds per decode step, with a backend that returns random logits.

    \b
    Everything but the model is timed: scheduling, packing, sampling, appending, stop strings
    (stop strings that never match) and the reading-order streamer the servers run. Each
    (seqs, context) runs plain, with stop strings, with streaming, and with both. "ms/step" is
    the median step; "mean" also counts the rare slow step (a garbage collection, say). The
    contexts of one (seqs, variant) run side by side (their engines take turns), and each
    context's ratio to the first is the median of the ratios taken in the same round.

    \b
    Stop strings are never completed by the random tokens. The text is checked only after a
    token that holds one of their last characters ("checked": the share of tokens that were);
    a stop string that ends in whitespace is checked after every token.
    """
    from apar_rt.bench.overhead import DEFAULT_STOPS, bench_overhead, format_rows, ratios, to_json

    if any(not s for s in stops):
        raise click.BadParameter("a stop string must not be empty", param_hint="--stop")
    rows = bench_overhead(model, _positive_ints(seqs, "--seqs"), _positive_ints(contexts, "--contexts"), steps,
                          vocab=vocab, stops=tuple(stops) or DEFAULT_STOPS, repeats=repeats,
                          log=(lambda m: None) if as_json else click.echo, stream_interval=stream_interval)
    click.echo(to_json(rows) if as_json else "\n" + format_rows(rows) + "\n\n" + ratios(rows))


@bench.command("widen")
@click.option("--model", type=click.Path(exists=True, file_okay=False), required=True,
              help="HF Llama folder to widen (e.g. samples/models/apar-tiny).")
@click.option("--output", type=click.Path(), required=True, help="New folder for the widened checkpoint.")
@click.option("--hidden-size", type=click.IntRange(min=1), required=True,
              help="Hidden size of the widened model: a multiple of the model's.")
@click.option("--num-layers", type=click.IntRange(min=1), default=None,
              help="Layers of the widened model; those past the model's are identities (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights that never reach the output.")
def bench_widen_cmd(model, output, hidden_size, num_layers, seed):
    """A larger checkpoint that computes exactly what MODEL does, for benchmarks at a realistic size.

    \b
    Heads, KV heads and the MLP grow with the hidden size (head_dim is kept); the model's weights
    sit in each matrix's leading block, the new weights that would write into the residual stream
    are zero and the others random, RMSNorm weights and eps are rescaled, and the extra layers are
    identities.
    The logits (so the greedy trees and texts) are MODEL's; each token costs what a dense model of
    the new size costs. MODEL's Medusa heads are widened alike (their drafts are the same).

    \b
    Example (the demo as a hidden-512, 8-layer model):
      apar-rt bench widen --model samples/models/apar-tiny --output /tmp/apar-512 --hidden-size 512 --num-layers 8
    """
    from apar_rt.bench.widen import widen_checkpoint

    try:
        s = widen_checkpoint(model, output, hidden_size, num_layers, seed, progress=True)
    except ValueError as e:   # a bad size or output names its flag first; ModelLoadError is one too
        flag = next((f for f in ("--hidden-size", "--num-layers", "--output") if str(e).startswith(f)), None)
        if flag:
            raise click.BadParameter(str(e), param_hint=flag) from None
        raise click.ClickException(str(e)) from None
    left = f"; not carried over: {', '.join(s['left_out'])}" if s["left_out"] else ""
    click.echo(f"wrote {output}: hidden size {s['hidden_size']} ({s['factor']}x), {s['num_layers']} layers, "
               f"{s['parameters'] / 1e6:.1f}M parameters{left}")


@bench.command("sampler")
@click.option("--rows", type=click.IntRange(min=1), default=256, show_default=True,
              help="Rows (sequences) sampled per pass.")
@click.option("--vocab", type=click.IntRange(min=2), default=32000, show_default=True, help="Logits width.")
@click.option("--reps", type=click.IntRange(min=1), default=7, show_default=True,
              help="Timed passes per side and case (medians shown).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (where the logits live).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's own).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_sampler_cmd(rows, vocab, reps, device, threads, as_json):
    """The numpy reference sampler against the torch (device) sampler, interleaved, on the same
    random logits: greedy, top-k 50 and top-p 0.9. Tokens are checked equal on every pass."""
    from apar_rt.backends import BackendUnavailable
    from apar_rt.backends.device import resolve_device
    from apar_rt.bench.sampler import bench_sampler, format_rows

    try:
        resolve_device(device)
    except (ValueError, BackendUnavailable) as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if threads:
        import torch

        torch.set_num_threads(threads)
    out = bench_sampler(rows, vocab, reps, device, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(out, indent=1) if as_json else format_rows(out))


@bench.command("backends")
@click.option("--model", type=click.Path(exists=True, file_okay=False), required=True, help="HF model folder.")
@click.option("--engine", "engine_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="onnxruntime engine folder of the same model (default: built into a temporary folder).")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="New tokens per request (EOS ignored).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs per side; the median is shown.")
@click.option("--mode", type=click.Choice(["ar", "apar"]), default="ar", show_default=True)
@click.option("--threads", type=int, default=None, help="torch and onnxruntime threads (default: their own).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_backends_cmd(model, engine_dir, batch_sizes, max_tokens, repeats, mode, threads, as_json):
    """Per-step latency and tokens/s of the onnxruntime backend against torch eager, side by side."""
    from apar_rt.bench.backends import bench_backends, format_rows

    sizes = _positive_ints(batch_sizes, "--batch-sizes")
    rows = bench_backends(model, engine_dir, sizes, max_tokens, repeats, mode=mode, threads=threads,
                          log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(rows, indent=1) if as_json else format_rows(rows))


# Commands defined in their own modules: (module, {command name: attribute}).
_COMMAND_MODULES = (
    ("apar_rt.train.commands", {"data": "data", "train": "train_cmd", "corpus": "corpus_cmd"}),
    ("apar_rt.build.commands", {"build": "build"}),
    ("apar_rt.plan_commands", {"plan": "plan_cmd"}),
    ("apar_rt.serve.commands", {"serve": "serve"}),
    ("apar_rt.medusa.commands", {"train-medusa": "train_medusa"}),
)


@bench.command("apar")
@click.option("--model", type=click.Path(exists=True, file_okay=False), required=True,
              help="HF model folder, or an engine folder for --backend onnxruntime (a model folder is then "
                   "built into a temporary engine first).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              default="samples/prompts/heldout.jsonl", show_default=True,
              help="JSONL prompts with 'prompt', 'structured' and 'kind' fields.")
@click.option("--max-tokens", type=int, default=400, show_default=True)
@click.option("--medusa", is_flag=True, help="Also run AR+Medusa and APAR+Medusa (heads in MODEL/medusa).")
@click.option("--medusa-tree", default=None, help="Draft tree preset or JSON file (default: tiny_9).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the full summary as JSON.")
def bench_apar_cmd(model, prompts_file, max_tokens, medusa, medusa_tree, backend, as_json):
    """APAR vs AR decode steps, fork rate and text order on a prompt set (e.g. the held-out prompts)."""
    from apar_rt.bench.apar_vs_ar import bench_apar, format_summary

    from apar_rt.backends import BackendUnavailable
    from apar_rt.config import ModelLoadError

    try:
        s = bench_apar(model, prompts_file, max_tokens=max_tokens, medusa=medusa, backend=backend,
                       tree=medusa_tree, log=lambda m: click.echo(m, err=True))
    except (ModelLoadError, BackendUnavailable) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(s, indent=1) if as_json else format_summary(s))


@bench.command("serving")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model (or engine) folder: `apar-rt serve` is started on it once per mode.")
@click.option("--url", default=None, help="Bench a server that is already running instead (one mode).")
@click.option("--modes", default="apar,ar", show_default=True, help="Comma-separated modes, side by side.")
@click.option("--concurrency", default="1,8,32", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--num-requests", type=int, default=None, help="Requests per level (default: max(2 x level, 8)).")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Prompts: .jsonl with a \"prompt\" field, or one per line (default: a built-in list).")
@click.option("--ignore-eos", is_flag=True, help="Always generate max_tokens tokens.")
@click.option("--serve-arg", "serve_args", multiple=True,
              help="Extra flag for `apar-rt serve` (repeatable), e.g. --serve-arg=--num-blocks=2048.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_serving_cmd(model, url, modes, concurrency, num_requests, max_tokens, prompts_file, ignore_eos,
                      serve_args, as_json):
    """TTFT, inter-token latency, end-to-end latency and requests/s of `apar-rt serve`, APAR and AR side by side."""
    from apar_rt.bench.serving import bench_serving, format_rows, load_prompts

    if (model is None) == (url is None):
        raise click.UsageError("give exactly one of --model DIR or --url URL")
    levels = _positive_ints(concurrency, "--concurrency")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not mode_list or set(mode_list) - {"apar", "ar"}:
        raise click.BadParameter(f"{modes!r}: modes are apar and ar", param_hint="--modes")
    try:
        prompts = load_prompts(prompts_file)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--prompts") from None
    rows = bench_serving(model, modes=mode_list, concurrency=levels, num_requests=num_requests,
                         max_tokens=max_tokens, prompts=prompts, url=url,
                         serve_args=[a for arg in serve_args for a in arg.split()], ignore_eos=ignore_eos,
                         log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(rows, indent=1) if as_json else format_rows(rows))


def _attach_optional_commands() -> None:
    import importlib

    for module, names in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # that part of apar-rt is not in this build
                continue
            raise
        for name, attr in names.items():
            main.add_command(getattr(mod, attr), name)


if __name__ == "__main__":
    # `python -m apar_rt.cli`: run the importable module's group, so that command modules which
    # import apar_rt.cli (for engine_options) attach to the same group instead of a second copy.
    from apar_rt.cli import main as _main
    _main()
else:
    _attach_optional_commands()
