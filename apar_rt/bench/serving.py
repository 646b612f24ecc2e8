"""Load test of `apar-rt serve`: TTFT, inter-token latency, end-to-end latency and requests/s.

For each mode (APAR and AR, side by side) the tool starts `apar-rt serve` on a free loopback
port (or uses `--url` for a server already running), warms it up, then, per concurrency level,
keeps that many streaming chat requests in flight (closed loop: a client sends its next
request when the previous one ends) until `num_requests` have finished.

Measured at the client, from the SSE stream:
- TTFT: request sent -> first chunk carrying text;
- ITL: gaps between successive text chunks (an APAR chunk may carry several tokens, and a
  branch's text waits until it is next in reading order);
- TPOT: (end-to-end - TTFT) / (completion tokens - 1), per request;
- end-to-end latency, requests/s and output tokens/s over the level's wall time.

This is a benchmark, not a test: numbers depend on the machine (the client shares it).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from apar_rt.prompts import DEFAULT_PROMPTS, read_prompts


def load_prompts(path: str | None) -> list[str]:
    """The prompts in `path` (see apar_rt.prompts.read_prompts), or the built-in list."""
    return read_prompts(path) if path else list(DEFAULT_PROMPTS)


@dataclass(slots=True)
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    last = None
    res = Result(ok=False)
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    res.error = ev["error"]["message"]
                    return res
                if ev.get("usage"):
                    res.tokens = ev["usage"]["completion_tokens"]
                for c in ev.get("choices", []):
                    if c["delta"].get("content"):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
    except Exception as e:  # a benchmark reports failures rather than stopping
        res.error = repr(e)
        return res
    res.e2e = time.perf_counter() - t0
    res.ok = last is not None
    if not res.ok:
        res.error = "no text"
    return res


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, num_requests: int,
                    max_tokens: int, ignore_eos: bool) -> dict:
    import httpx

    results: list[Result] = []
    counter = iter(range(num_requests))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            for i in counter:
                results.append(await one_request(client, url, model, prompts[i % len(prompts)], max_tokens,
                                                 ignore_eos))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(results: list[Result], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    e2e = [r.e2e for r in ok]
    ms = 1000.0
    return {
        "concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "out_tok_per_s": round(sum(r.tokens for r in ok) / wall, 1) if wall else 0.0,
        "mean_out_tokens": round(statistics.mean([r.tokens for r in ok]), 1) if ok else 0.0,
        "ttft_ms_median": round(statistics.median(ttft) * ms, 1) if ttft else float("nan"),
        "ttft_ms_p99": round(_pct(ttft, 0.99) * ms, 1),
        "itl_ms_median": round(statistics.median(itl) * ms, 2) if itl else float("nan"),
        "itl_ms_p99": round(_pct(itl, 0.99) * ms, 2),
        "tpot_ms_median": round(statistics.median(tpot) * ms, 2) if tpot else float("nan"),
        "e2e_ms_median": round(statistics.median(e2e) * ms, 1) if e2e else float("nan"),
        "e2e_ms_p99": round(_pct(e2e, 0.99) * ms, 1),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`apar-rt serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, mode: str, serve_args: list[str], log=print, timeout: float = 300.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from apar_rt.cli import main; main()", "serve", "--model", model,
               "--mode", mode, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
               "--served-model-name", "bench", *serve_args]
        log(f"starting: apar-rt {' '.join(cmd[3:])}")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"apar-rt serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("apar-rt serve did not become healthy")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def bench_serving(model: str | None, *, modes=("apar", "ar"), concurrency=(1, 8, 32),
                  num_requests: int | None = None, max_tokens: int = 128, prompts: list[str] | None = None,
                  url: str | None = None, serve_args: list[str] | None = None, ignore_eos: bool = False,
                  log=print) -> list[dict]:
    """Rows of measurements, one per (mode, concurrency)."""
    import httpx

    prompts = prompts or list(DEFAULT_PROMPTS)
    rows = []
    for mode in ([None] if url else modes):
        server = None if url else ServeProcess(model, mode, list(serve_args or []), log=log)
        base = url or server.url
        try:
            served = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
            warm = asyncio.run(run_level(base, served, prompts, 2, 4, max_tokens, ignore_eos))  # warm-up
            if warm["failed"]:
                raise RuntimeError(f"warm-up requests failed: {warm['errors']}")
            for c in concurrency:
                n = num_requests or max(2 * c, 8)
                row = asyncio.run(run_level(base, served, prompts, c, n, max_tokens, ignore_eos))
                row["mode"] = mode or "server"
                forks = _metric(base, "apar_rt_forks_total")
                row["forks_total"] = forks
                rows.append(row)
                log(format_rows([row], header=False))
        finally:
            if server is not None:
                server.close()
    return rows


def _metric(url: str, name: str) -> float | None:
    import httpx

    try:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    except (httpx.HTTPError, ValueError):
        pass
    return None


COLUMNS = [("mode", "mode", "{}"), ("concurrency", "conc", "{}"), ("requests", "reqs", "{}"),
           ("failed", "fail", "{}"), ("req_per_s", "req/s", "{:.2f}"), ("out_tok_per_s", "tok/s", "{:.0f}"),
           ("mean_out_tokens", "tok/req", "{:.0f}"), ("ttft_ms_median", "TTFT p50", "{:.0f}"),
           ("ttft_ms_p99", "TTFT p99", "{:.0f}"), ("itl_ms_median", "ITL p50", "{:.1f}"),
           ("itl_ms_p99", "ITL p99", "{:.1f}"), ("tpot_ms_median", "TPOT p50", "{:.1f}"),
           ("e2e_ms_median", "E2E p50", "{:.0f}"), ("e2e_ms_p99", "E2E p99", "{:.0f}")]


def format_rows(rows: list[dict], header: bool = True) -> str:
    widths = [max(len(title), 7) for _, title, _ in COLUMNS]
    lines = []
    if header:
        lines.append("  ".join(t.rjust(w) for (_, t, _), w in zip(COLUMNS, widths)) + "   (times in ms)")
    for r in rows:
        lines.append("  ".join(fmt.format(r[k]).rjust(w) for (k, _, fmt), w in zip(COLUMNS, widths)))
    return "\n".join(lines)
