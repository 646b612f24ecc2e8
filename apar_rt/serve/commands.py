"""`apar-rt serve`: the OpenAI-compatible server."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from apar_rt.cli import (_engine_dir_defaults, _engine_kwargs, _fail_on_value_error, _fit_kv_pool,
                         _model_or_engine, engine_options)


@click.command()
@_model_or_engine
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0 picks a free one).")
@click.option("--served-model-name", "served_names", multiple=True,
              help="Name(s) clients pass as `model` (default: the folder's name).")
@click.option("--default-temperature", type=float, default=1.0, show_default=True,
              help="Temperature of requests that give none (OpenAI's default is 1.0; 0 is greedy).")
@click.option("--api-key", envvar="APAR_RT_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every /v1 route (as vLLM's --api-key).")
@click.option("--protect-metrics", is_flag=True,
              help="Require the API key on /metrics too (default: /metrics stays open for scrapers).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=4 << 20, show_default=True,
              help="Largest request body; a larger one gets 413 before it is read.")
@click.option("--stream-interval", type=click.IntRange(min=1), default=1, show_default=True,
              help="Send a streamed response's new text every N engine steps (its first text at once): the "
                   "same text in fewer chunks, for more throughput under load (as SGLang's --stream-interval).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.pass_context
def serve(ctx, model, engine_dir, backend, dtype, device, host, port, served_names, default_temperature,
          api_key, protect_metrics, max_body_bytes, stream_interval, log_level, **kw):
    """Serve a model over an OpenAI-compatible HTTP API (streaming included).

    \b
    Endpoints: POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, /metrics.
    Example:
      apar-rt serve --model samples/models/apar-tiny --port 8000
      curl localhost:8000/v1/chat/completions -d '{"model": "apar-tiny", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Give me 3 tips for better sleep."}]}'
    /v1/completions takes its prompt as it is (as OpenAI and vLLM do); /v1/chat/completions
    applies the model's chat template (Vicuna v1.1 when it has none).
    """
    from apar_rt.backends import BackendUnavailable
    from apar_rt.config import ModelLoadError
    from apar_rt.engine import Engine
    from apar_rt.serve.openai_server import OpenAIServer

    if (model is None) == (engine_dir is None):
        raise click.UsageError("give exactly one of --model DIR or --engine DIR")
    path = model or engine_dir
    if engine_dir is not None:
        backend = _engine_dir_defaults(ctx, engine_dir, backend, kw)
    _fit_kv_pool(ctx, path, backend, device, dtype, kw)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine.from_pretrained(path, backend=backend, dtype=dtype, device=device,
                                        **_engine_kwargs(kw))
    except (ModelLoadError, BackendUnavailable) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:
        _fail_on_value_error(e)
    names = list(served_names) or [Path(path).resolve().name]
    if protect_metrics and not api_key:
        raise click.UsageError("--protect-metrics needs --api-key (or APAR_RT_API_KEY)")
    server = OpenAIServer(engine, names, host=host, port=port, log_level=log_level,
                          default_temperature=default_temperature, api_key=api_key or None,
                          protect_metrics=protect_metrics, max_body_bytes=max_body_bytes,
                          stream_interval=stream_interval)
    click.echo(f"apar-rt serve: model {names[0]!r} ({backend}, {kw['mode']} mode) on http://{host}:{port}/v1",
               err=True)
    server.run()
