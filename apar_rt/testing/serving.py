"""Helpers for tests of the servers built on `apar_rt.serve.engine_loop.EngineLoop`."""

from __future__ import annotations

import time


def wait_until_idle(loop, timeout: float = 10.0) -> bool:
    """Wait (bounded) until the engine loop holds no request (running, waiting or streaming)
    and no KV block; False if it still does after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = loop.stats
        if s.kv_blocks_used == 0 and s.running == 0 and s.waiting == 0 and not loop._live:
            return True
        time.sleep(0.02)
    return False
