"""Click commands for the training side: ``data format``, ``data tokenizer``, ``corpus``, ``train``.

Attach them to the main group with::

    from apar_rt.train.commands import corpus_cmd, data, train_cmd
    main.add_command(data)        # apar-rt data format | data tokenizer
    main.add_command(corpus_cmd)  # apar-rt corpus
    main.add_command(train_cmd)   # apar-rt train

Heavy imports (torch, transformers) happen inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group("data")
def data() -> None:
    """Prepare APAR training data."""


@data.command("format")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Tokenizer folder; when given, report token counts of the output.")
@click.option("--plain/--no-plain", default=True, show_default=True,
              help="Keep unstructured answers as plain causal examples.")
@click.option("--filtered-as-plain", is_flag=True,
              help="Keep structured answers that the reference's pack filters drop (code, '=', 'http', CJK, "
                   "...) as plain examples instead of dropping them.")
@click.option("--flat-fraction", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Fraction of structured answers also kept flat (unchanged), so the model can answer "
                   "in AR mode too.")
def data_format_cmd(input_path: Path, output_path: Path, tokenizer_dir: Path | None, plain: bool,
                    filtered_as_plain: bool, flat_fraction: float) -> None:
    """Format ShareGPT conversations (INPUT: .json array or .jsonl) into APAR examples (OUTPUT: .jsonl).

    Structured answers (numbered lists of 'N. title: detail', or 3+ paragraphs) become one main
    example with [SplitMask] forks plus one child example per fork, following THUDM/APAR's
    data/filter_structured.py and as_apar_format.py. The output schema is documented in
    apar_rt/train/data_format.py. Prints counts per rule and per rejection reason as JSON.
    """
    from apar_rt.train import data_format as df

    if output_path.resolve() == input_path.resolve():
        raise click.BadParameter("OUTPUT must differ from INPUT", param_hint="OUTPUT")
    try:
        stats = df.format_file(input_path, output_path, plain=plain, filtered_as_plain=filtered_as_plain,
                               flat_fraction=flat_fraction)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="INPUT") from None
    report = stats.as_dict()
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        from apar_rt.train.trainer import encode_example

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
        missing = [t for t in (df.FORK, df.CHILD) if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        lengths = [len(encode_example(ex, tok, 10**9)[0]) for ex in df.read_examples(output_path)]
        report["tokens"] = {"total": sum(lengths), "max": max(lengths, default=0),
                            "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0}
    click.echo(json.dumps(report, indent=1))


@data.command("tokenizer")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("output_dir", metavar="OUTPUT_DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--vocab-size", type=click.IntRange(min=259), default=1024, show_default=True,
              help="BPE vocabulary size, control tokens excluded.")
@click.option("--control-tokens/--no-control-tokens", default=True, show_default=True,
              help="Add [SplitMask] and [SplitSop] at the end of the vocabulary.")
def data_tokenizer_cmd(input_path: Path, output_dir: Path, vocab_size: int, control_tokens: bool) -> None:
    """Train a byte-level BPE tokenizer on ShareGPT conversations (INPUT) into a HF folder (OUTPUT_DIR).

    The texts are each first-turn prompt in the Vicuna v1.1 template and its answer.
    """
    from apar_rt.model.tokenizer import vicuna_v1_1_prompt
    from apar_rt.train import data_format as df
    from apar_rt.train.tokenizer import train_tokenizer

    try:
        records = df.read_records(input_path)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="INPUT") from None

    def texts():
        for r in records:
            turn = df.first_turn(r)
            if turn:
                yield vicuna_v1_1_prompt(turn[0])
                yield " " + turn[1]

    tok = train_tokenizer(texts(), output_dir, vocab_size=vocab_size, control_tokens=control_tokens)
    click.echo(f"wrote {output_dir} ({len(tok)} tokens)")


@click.command("corpus")
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--n-list", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Numbered-list answers.")
@click.option("--n-paragraph", type=click.IntRange(min=0), default=600, show_default=True,
              help="Multi-paragraph answers.")
@click.option("--n-plain", type=click.IntRange(min=0), default=600, show_default=True,
              help="Unstructured answers (a quarter of them small talk).")
@click.option("--heldout", "heldout_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the held-out prompts (JSONL with a 'structured' flag) here.")
@click.option("--include-heldout", is_flag=True, help="Do not exclude the held-out prompt keys.")
def corpus_cmd(output_path: Path, seed: int, n_list: int, n_paragraph: int, n_plain: int,
               heldout_path: Path | None, include_heldout: bool) -> None:
    """Generate the synthetic demo instruction corpus (ShareGPT JSONL) into OUTPUT.

    Answers are numbered lists ('1. Title: detail. detail.'), multi-paragraph texts and plain
    answers over 12 'practical tips' topics; see apar_rt/train/corpus.py for the held-out split.
    """
    from apar_rt.train import corpus

    exclude = set() if include_heldout else set(corpus.heldout_keys(seed))
    samples = corpus.generate(seed, n_list=n_list, n_paragraph=n_paragraph, n_plain=n_plain, exclude=exclude)
    corpus.write_jsonl([corpus.to_record(s, i) for i, s in enumerate(samples)], output_path)
    if heldout_path is not None:
        corpus.write_jsonl(corpus.heldout_records(seed), heldout_path)
    click.echo(f"wrote {len(samples)} conversations to {output_path}"
               + (f" and held-out prompts to {heldout_path}" if heldout_path else ""))


@click.command("train")
@click.argument("model_dir", metavar="MODEL", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data_paths", metavar="DATA...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the fine-tuned checkpoint (safetensors) and train_log.jsonl.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Tokenizer folder (default: MODEL).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: --epochs).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True,
              help="Peak learning rate (the reference fine-tunes Vicuna at 2e-5; the tiny demo uses 2e-3).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=30, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=2048, show_default=True,
              help="Examples are cut to this many tokens.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
def train_cmd(model_dir: Path, data_paths: tuple[Path, ...], output_dir: Path, tokenizer_dir: Path | None,
              steps: int | None, epochs: float, batch_size: int, lr: float, warmup_steps: int, max_length: int,
              device: str, threads: int | None, seed: int, log_every: int) -> None:
    """Fine-tune a HF Llama checkpoint (MODEL) on APAR examples (DATA..., from `apar-rt data format`).

    Adds [SplitMask]/[SplitSop] when the tokenizer lacks them (the embedding and LM head grow
    by two rows), trains with the loss on target segments only, and saves a HF checkpoint
    (safetensors) with its tokenizer to --output, plus train_log.jsonl.
    """
    from apar_rt.train.trainer import TrainConfig, train

    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise click.BadParameter(f"{device!r} is not one of auto, cpu, cuda, cuda:N", param_hint="--device")
    cfg = TrainConfig(model=str(model_dir), data=[str(p) for p in data_paths], output=str(output_dir),
                      tokenizer=str(tokenizer_dir) if tokenizer_dir else None, steps=steps, epochs=epochs,
                      batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, max_length=max_length,
                      device=device, threads=threads, seed=seed, log_every=log_every,
                      progress=sys.stderr.isatty())
    try:
        res = train(cfg)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps({"output": res.output, "steps": res.steps, "first_loss": round(res.first_loss, 4),
                           "final_loss": round(res.final_loss, 4), "rows_added": res.rows_added,
                           "elapsed_s": res.elapsed_s}))
