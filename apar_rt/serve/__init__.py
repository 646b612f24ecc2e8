"""Serving: the engine in a loop thread, and the servers that sit on it.

- `engine_loop.EngineLoop` owns an `Engine` in one thread (the engine is not thread-safe),
  takes add/abort commands from any thread, and fans each step's output out to per-request
  `RequestStream`s as `StreamEvent`s: reading-order text deltas (and, on request, per-branch
  deltas).
- `openai_server`: the OpenAI-compatible HTTP server (`apar-rt serve`).
- `runtime/model_repository/apar/1/model.py`: the Triton Python-backend model over the same loop.

Nothing here is imported by the core; the servers' libraries (starlette, uvicorn,
prometheus_client) are the `serve` extra.
"""

from apar_rt.serve.engine_loop import BranchEvent, EngineLoop, RequestStream, StreamEvent

__all__ = ["EngineLoop", "RequestStream", "StreamEvent", "BranchEvent"]
