"""`apar-rt serve`: the OpenAI-compatible server."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from apar_rt.cli import _engine_kwargs, _fail_on_value_error, engine_options


def _model_flag_optional(f):
    """`engine_options` makes --model required; `serve` takes --model or --engine."""
    for p in getattr(f, "__click_params__", ()):
        if p.name == "model":
            p.required = False
            p.help = "Hugging Face model folder (or give --engine)."
    return f


def _manifest_backend(engine_dir: str) -> str | None:
    try:
        return json.loads((Path(engine_dir) / "manifest.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


@click.command()
@_model_flag_optional
@engine_options
@click.option("--engine", "engine_dir", type=click.Path(), default=None,
              help="Engine folder from `apar-rt build` (its manifest's backend is used unless --backend is given).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0 picks a free one).")
@click.option("--served-model-name", "served_names", multiple=True,
              help="Name(s) clients pass as `model` (default: the folder's name).")
@click.option("--default-temperature", type=float, default=1.0, show_default=True,
              help="Temperature of requests that give none (OpenAI's default is 1.0; 0 is greedy).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(model, engine_dir, backend, dtype, device, host, port, served_names, default_temperature, log_level,
          **kw):
    """Serve a model over an OpenAI-compatible HTTP API (streaming included).

    \b
    Endpoints: POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, /metrics.
    Example:
      apar-rt serve --model samples/models/apar-tiny --port 8000
      curl localhost:8000/v1/completions -d '{"model": "apar-tiny", "prompt": "Give me 3 tips.", "max_tokens": 64}'
    """
    from apar_rt.backends import BackendUnavailable
    from apar_rt.config import ModelLoadError
    from apar_rt.engine import Engine
    from apar_rt.serve.openai_server import OpenAIServer

    if (model is None) == (engine_dir is None):
        raise click.UsageError("give exactly one of --model DIR or --engine DIR")
    path = model or engine_dir
    if engine_dir is not None:
        source = click.get_current_context().get_parameter_source("backend")
        if source == click.core.ParameterSource.DEFAULT:
            backend = _manifest_backend(engine_dir) or backend
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine.from_pretrained(path, backend=backend, dtype=dtype, device=device, **_engine_kwargs(kw))
    except (ModelLoadError, BackendUnavailable) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:
        _fail_on_value_error(e)
    names = list(served_names) or [Path(path).resolve().name]
    server = OpenAIServer(engine, names, host=host, port=port, log_level=log_level,
                          default_temperature=default_temperature)
    click.echo(f"apar-rt serve: model {names[0]!r} ({backend}, {kw['mode']} mode) on http://{host}:{port}/v1",
               err=True)
    server.run()
