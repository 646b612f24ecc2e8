"""Side by side with onnxruntime-genai: the same HF folder, prompts and lengths, runs interleaved.

apar-rt runs its onnxruntime engine (built from the folder, or `--engine`); the peer runs the
model that onnxruntime-genai's own builder makes from the same folder
(`python -m onnxruntime_genai.models.builder -i MODEL -o DIR -p fp32 -e cpu`). Both get the same
token ids (apar-rt's encoding of each prompt; the peer gets them right-padded into one batch, its
static batching, as its own encode_batch pads) and the same intra-op thread count. Runs alternate (apar-rt, peer, apar-rt, ...)
so that machine noise hits both alike: each side's figure is the median of its `repeats` runs, and each
ratio is the median of the rounds' ratios (a round's two runs back to back), so that the machine's
drift over minutes, which moves both runs of a round, cancels. On a prompt set a round runs the
whole set on each side back to back (apar-rt, the peer, apar-rt again in the peer's waves), each
engine warm as it would run alone in a server.

Measures:
* AR tokens/s: every request decodes exactly `max_tokens` tokens (EOS ignored on both sides);
* the AR rows' decode step (time per output token): the median time of a step in which every
  sequence decodes one token, apar-rt's `Engine.step` (scheduling and sampling included)
  against the peer's `generate_next_token` after its first token;
* requests/s on a prompt set (the held-out prompts): apar-rt in `--mode apar` (EOS honoured)
  against the peer's AR decoding each prompt to the length of apar-rt's AR answer, `batch`
  requests at a time (see `_requests_per_s`): each engine as it serves `batch` concurrent
  clients. apar-rt batches continuously (a finished request's seat goes to the next prompt at
  once); the peer batches statically on the CPU (its `Engine` API, 0.18, without PagedAttention,
  which its builder makes for CUDA only, runs a group to its end before it admits more), so it
  runs waves of `batch` prompts through its generator, each to the wave's longest answer.
  apar-rt's requests/s in such waves is reported too, and where apar-rt's in-flight steps spend
  their time (`step_split`: the forward, the Medusa heads, the engine). The APAR runs get the engine's seats
  (`apar_max_num_seqs`, default its --max-batch-size), as a server runs it: with only `batch`
  seats, the fair share is one seat per request and no request could fork.

apar-rt's onnxruntime engine moves its weights and pool to huge pages on Linux (see
`backends.huge_pages`); the peer's memory is left as its runtime allocates it. Each row's
`apar_rt_huge_pages_mib` (in --json) says how much was moved.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEER = "onnxruntime-genai"
APAR_SEATS_PER_REQUEST = 4   # an engine built for the comparison holds 4 seats per request of the largest batch
INSTALL_HINT = "pip install onnxruntime-genai  (or: pip install 'apar-rt[peer]')"


class PeerUnavailable(RuntimeError):
    """The peer engine is not installed or its builder failed."""


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise PeerUnavailable(f"the peer {PEER} is not installed; install it with: {INSTALL_HINT}") from None
    return og


def build_peer_model(model: str, out: Path, threads: int | None = None, log=print) -> Path:
    """onnxruntime-genai's fp32 CPU model of `model` in `out` (kept when already built there)."""
    import_genai()
    out = Path(out)
    if not (out / "genai_config.json").exists():
        log(f"building the {PEER} model with its own builder into {out}")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise PeerUnavailable(f"{PEER}'s builder failed on {model!r}:\n{res.stderr[-2000:]}")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if threads:
        opts["intra_op_num_threads"] = threads
    else:
        opts.pop("intra_op_num_threads", None)
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return out


class Peer:
    """onnxruntime-genai's generator over a batch of token-id prompts (greedy)."""

    def __init__(self, model_dir: Path) -> None:
        og = import_genai()
        self.og = og
        self.model = og.Model(str(model_dir))
        cfg = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
        self.pad_id = int(cfg.get("pad_token_id", 0))
        eos = cfg.get("eos_token_id", [])
        self.eos = {int(e) for e in (eos if isinstance(eos, list) else [eos])}

    def generate(self, ids: list[list[int]], max_tokens: int, ignore_eos: bool,
                 step_times: list[float] | None = None) -> list[list[int]]:
        """Generate for one right-padded batch; returns each prompt's new tokens (up to its EOS).
        step_times: gets the time of each `generate_next_token` after the first (decode steps)."""
        import numpy as np

        P = max(len(i) for i in ids)
        batch = np.array([list(i) + [self.pad_id] * (P - len(i)) for i in ids], np.int32)   # as its encode_batch
        params = self.og.GeneratorParams(self.model)
        opts = {"max_length": P + max_tokens, "do_sample": False, "batch_size": len(ids)}
        if ignore_eos:
            opts["min_length"] = P + max_tokens
        params.set_search_options(**opts)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(batch)
        first = True
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            if step_times is not None and not first:
                step_times.append(time.perf_counter() - t)
            first = False
        out = []
        for b in range(len(ids)):
            new = [int(t) for t in gen.get_sequence(b)[P:]]
            if not ignore_eos:
                cut = next((k for k, t in enumerate(new) if t in self.eos), None)
                new = new if cut is None else new[:cut + 1]
            out.append(new)
        return out


def _ours(engine: str, mode: str, threads: int | None, max_num_seqs: int, medusa_tree: str | None = None,
          speculative_disable_by_batch_size: int | None = None):
    from apar_rt.bench.backends import _ort_llm

    kw = {"mode": mode, "max_num_seqs": max_num_seqs}
    if medusa_tree is not None:
        kw["medusa_tree"] = medusa_tree
        kw["speculative_disable_by_batch_size"] = speculative_disable_by_batch_size
    return _ort_llm(engine, threads, kw)


def _settle(llm) -> int:
    """Wait until apar-rt's engine has moved its own memory to huge pages (in the background, see
    `backends.huge_pages`), so that the collapse neither runs during a timed run nor takes in
    memory that the peer allocates next. Returns the MiB it moved (0 where the system does not
    allow it, or with huge_pages off): a row's figures depend on it."""
    pager = getattr(llm.engine.backend, "huge_pages", None)
    done = pager.wait() if pager is not None else None
    return done.collapsed >> 20 if done is not None else 0


def decode_step_times(engine) -> list[float]:
    """Time `engine.step` from now on: returns the list that gets the duration of each step whose
    forward had one new token per sequence (a decode step; prefill and mixed steps are left out)."""
    times: list[float] = []
    step, forward = engine.step, engine.backend.forward
    decode = [False]

    def timed_forward(s):
        decode[0] = int(s.mask.shape[1]) == 1
        return forward(s)

    def timed_step():
        decode[0] = False
        t = time.perf_counter()
        out = step()
        if decode[0]:
            times.append(time.perf_counter() - t)
        return out

    engine.backend.forward = timed_forward
    engine.step = timed_step
    return times


_MISSING = object()


def step_split(engine, run) -> dict:
    """Where apar-rt's engine steps spend their time while `run()` runs (one pass, after the timed
    ones: the timers cost a few microseconds a step): the backend's forward (the step graph, its
    inputs staged and bound), the Medusa heads' drafting run (`medusa_topk`; 0 without a tree),
    and the engine itself (scheduling, sampling, verification, appending, text), each a share of
    the steps' time. Returns the `apar_rt_apar_*` fields of a row: steps (`Engine.num_steps`), ms a step, the three
    shares (summing to 1). The engine and its backend are left as they were."""
    backend = engine.backend
    spent = {"forward": 0.0, "heads": 0.0, "step": 0.0}
    first_step = engine.num_steps
    patched: list[tuple[object, str, object]] = []

    def timed(obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t

        patched.append((obj, name, vars(obj).get(name, _MISSING)))
        setattr(obj, name, wrapper)

    timed(backend, "forward", "forward")
    timed(backend, "medusa_topk", "heads")
    timed(engine, "step", "step")
    try:
        run()
    finally:
        for obj, name, before in reversed(patched):
            if before is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, before)
    steps = engine.num_steps - first_step
    total = spent["step"] or 1.0
    forward, heads = spent["forward"] / total, spent["heads"] / total
    return {"apar_rt_apar_steps": steps, "apar_rt_apar_step_ms": 1000 * spent["step"] / max(1, steps),
            "apar_rt_apar_forward_share": forward, "apar_rt_apar_heads_share": heads,
            "apar_rt_apar_engine_share": 1.0 - forward - heads}


def _interleave(run_a, run_b, repeats: int) -> tuple[list[float], list[float], int, int]:
    """Warm both, then alternate timed runs; returns times and the work each run reported."""
    run_a(), run_b()
    ta, tb, wa, wb = [], [], 0, 0
    for _ in range(repeats):
        t = time.perf_counter()
        wa = run_a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        wb = run_b()
        tb.append(time.perf_counter() - t)
    return ta, tb, wa, wb


def _round_ratio(ta: list[float], tb: list[float], wa: float, wb: float) -> float:
    """apar-rt's rate over the peer's (work `wa` in seconds `ta[i]` against `wb` in `tb[i]`): the
    median of the rounds' ratios."""
    return statistics.median((wa / a) / (wb / b) for a, b in zip(ta, tb))


def bench_peer(model: str, *, engine: str | None = None, peer_dir: str | None = None, batch_sizes=(1, 8),
               max_tokens: int = 64, repeats: int = 5, threads: int | None = None,
               prompts_file: str | None = None, apar_max_tokens: int = 256, input_len: int | None = None,
               apar_max_num_seqs: int | None = None, apar_medusa_tree: str | None = None,
               apar_speculative_disable_by_batch_size: int | None = None, log=print) -> list[dict]:
    """Rows of AR tokens/s (and, with `prompts_file`, APAR requests/s) against onnxruntime-genai.

    input_len: prompt tokens per request of the AR rows (the built-in prompts' tokens repeated and
    cut to that length; default: the built-in prompts as they are). Prefill and the growing
    context's decode cost are both in the tokens/s, as a user sees them.
    apar_max_num_seqs: the APAR runs' max_num_seqs (all branches of all requests in a step; at
    most the engine's --max-batch-size, which is the default). An engine built here gets
    `APAR_SEATS_PER_REQUEST` times the largest batch.
    apar_medusa_tree: the APAR runs also verify this Medusa draft tree (`check_apar_medusa`); an
    engine built here then takes MODEL's heads.
    apar_speculative_disable_by_batch_size: with a tree, no tree in a step after one of at least
    this many sequences (the engine's `speculative_disable_by_batch_size`, as `apar-rt serve
    --speculative-disable-by-batch-size` runs it).

    Raises:
        PeerUnavailable: onnxruntime-genai is missing (the message says how to install it) or its
            builder failed.
    """
    from apar_rt import SamplingParams
    from apar_rt.bench.apar_vs_ar import load_prompts
    from apar_rt.bench.generate import _prompts

    import_genai()
    tmp = tempfile.TemporaryDirectory(prefix="apar-rt-peer-")
    try:
        if engine is None:
            from apar_rt.build.builder import BuildOptions, build

            engine = str(Path(tmp.name) / "apar-rt")
            log(f"building the apar-rt onnxruntime engine into {engine}")
            build(BuildOptions(model=str(model), output=engine, backend="onnxruntime", dtype="float32",
                               max_batch_size=apar_seats(None, None, batch_sizes),
                               medusa=apar_medusa_tree is not None),
                  progress=False, log=lambda m: None)
        seats = apar_seats(engine, apar_max_num_seqs)
        peer_path = build_peer_model(model, Path(peer_dir) if peer_dir else Path(tmp.name) / "peer", threads, log)
        rows = []
        for bs in batch_sizes:
            ar = _ours(engine, "ar", threads, bs)
            huge = _settle(ar)
            peer = Peer(peer_path)
            ids = [ar.engine.encode(p) for p in _prompts(bs)]
            if input_len is not None:
                ids = [(p * (input_len // len(p) + 1))[:input_len] for p in ids]
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            steps_a, steps_b = decode_step_times(ar.engine), []

            def run_ours():
                return sum(o.stats["generated_tokens"] for o in ar.generate(prompt_token_ids=ids, params=params))

            def run_peer():
                return sum(map(len, peer.generate(ids, max_tokens, True, step_times=steps_b)))

            ta, tb, na, nb = _interleave(run_ours, run_peer, repeats)
            ma, mb = statistics.median(ta), statistics.median(tb)
            da, db = (1000 * statistics.median(x) if x else None for x in (steps_a, steps_b))
            row = {"batch": bs, "input_len": statistics.mean(map(len, ids)), "max_tokens": max_tokens,
                   "repeats": repeats, "threads": threads,
                   "apar_rt_ar_tok_s": na / ma, "peer_ar_tok_s": nb / mb, "ar_ratio": _round_ratio(ta, tb, na, nb),
                   "apar_rt_decode_ms": da, "peer_decode_ms": db,
                   "decode_ratio": db / da if da and db else None,   # (steps of all rounds pooled)
                   "apar_rt_huge_pages_mib": huge}
            if prompts_file:
                row.update(_requests_per_s(engine, peer, load_prompts(prompts_file), bs, apar_max_tokens,
                                           repeats, threads, seats, apar_medusa_tree,
                                           apar_speculative_disable_by_batch_size))
            rows.append(row)
            log(format_rows([row], header=not rows[:-1]))
        return rows
    finally:
        tmp.cleanup()


def check_apar_medusa(tree: str, engine: str | None, model: str) -> None:
    """Refuse, before anything runs, a Medusa tree the APAR runs cannot verify: not a preset or
    tree file, deeper than the heads, or no heads (in `engine`'s graph, else in MODEL/medusa,
    which an engine built by `bench_peer` takes).

    Raises:
        ValueError: saying which.
    """
    from apar_rt.medusa.tree import load_tree

    t = load_tree(tree)
    if engine:
        from apar_rt.build.manifest import read_manifest

        heads = read_manifest(engine).medusa.get("num_heads", 0)
        where = f"the engine {engine!r} was built without Medusa heads (rebuild it from a model with medusa/)"
    else:
        from apar_rt.memory_plan import medusa_shape

        heads = medusa_shape(model)[0]
        where = f"{model!r} has no medusa/ folder of Medusa heads"
    if not heads:
        raise ValueError(where)
    t.check_heads(heads)


def apar_seats(engine: str | None, wanted: int | None, batch_sizes=(1,)) -> int:
    """The APAR runs' max_num_seqs: `wanted`, else the engine's --max-batch-size (with no
    `engine`, that of the one `bench_peer` builds for `batch_sizes`).

    Raises:
        ValueError: `wanted` is above that --max-batch-size.
    """
    from apar_rt.build.manifest import read_manifest

    limit = read_manifest(engine).max_batch_size if engine else APAR_SEATS_PER_REQUEST * max(batch_sizes)
    if wanted is not None and wanted > limit:
        raise ValueError(f"--apar-max-num-seqs {wanted} exceeds the engine's --max-batch-size {limit} "
                         f"(rebuild the engine with a larger --max-batch-size, or ask for at most {limit})")
    return wanted or limit


def in_flight(llm, ids: list[list[int]], params, concurrency: int) -> list[str | None]:
    """Serve the prompts `ids` on apar-rt's engine with `concurrency` requests in flight, as a
    server under that many clients runs: the first `concurrency` are admitted, and each one that
    finishes hands its place to the next prompt before the next step (continuous batching).
    `params`: one SamplingParams for all, or one per prompt. Returns each prompt's text, in order
    (greedy: the same as `llm.generate` on any grouping).

    Raises:
        RuntimeError: a request failed (a figure that counts it as served would be wrong); the
            requests still running are aborted.
    """
    engine = llm.engine
    each = params if isinstance(params, (list, tuple)) else [params] * len(ids)
    texts: list[str | None] = [None] * len(ids)
    running: dict[str, int] = {}     # request id -> prompt index
    nxt = 0
    while nxt < len(ids) or running:
        while nxt < len(ids) and len(running) < concurrency:
            running[engine.add_request(None, each[nxt], prompt_token_ids=ids[nxt])] = nxt
            nxt += 1
        for o in engine.step():
            if o.finished:
                texts[running.pop(o.request_id)] = o.text
                if o.error is not None:
                    for rid in running:   # leave the engine empty for whoever catches this
                        engine.abort_request(rid)
                    _served(o)
    return texts


def _served(output):
    """`output`, unless its request failed: then RuntimeError with the engine's message."""
    if output.error is not None:
        raise RuntimeError(f"apar-rt failed request {output.request_id} during the benchmark: {output.error}")
    return output


def _requests_per_s(engine, peer: Peer, prompts: list[dict], bs: int, max_tokens: int, repeats: int,
                    threads: int | None, seats: int, medusa_tree: str | None = None,
                    speculative_disable_by_batch_size: int | None = None) -> dict:
    """apar-rt APAR against the peer's AR on a prompt set, `bs` requests at a time: apar-rt with
    `bs` in flight (`in_flight`), and also in waves of `bs` prompts, against the peer's waves.

    The peer cannot ban the control tokens, so its greedy AR on an APAR-trained model stops
    after the skeleton (the [Fork] main text, without the children's details). It therefore
    decodes each prompt to the length of apar-rt's AR answer (EOS ignored; a wave runs to its
    longest answer, as static batching does): the same answers' worth of tokens. Its to-EOS
    figure is reported too.

    seats: apar-rt's max_num_seqs in APAR mode. medusa_tree: its APAR runs verify this draft tree,
    except after a step of at least `speculative_disable_by_batch_size` sequences (None: always).

    After the timed rounds, one more in-flight pass, untimed, splits apar-rt's step time
    (`step_split`: forward, Medusa heads, engine), and its texts must be the timed passes'.
    """
    from apar_rt import SamplingParams

    ar = _ours(engine, "ar", threads, max(bs, 8))
    _settle(ar)
    ids = [ar.engine.encode(r["prompt"]) for r in prompts]
    params = SamplingParams(max_tokens=max_tokens)
    ar_lens = [o.stats["generated_tokens"] for o in ar.generate(prompt_token_ids=ids, params=params)]
    llm = _ours(engine, "apar", threads, seats, medusa_tree, speculative_disable_by_batch_size)
    _settle(llm)
    waves = [range(i, min(i + bs, len(ids))) for i in range(0, len(ids), bs)]

    def run_peer(to_eos: bool, wave_list=waves):
        for w in wave_list:
            n = max_tokens if to_eos else max(ar_lens[i] for i in w)
            peer.generate([ids[i] for i in w], n, ignore_eos=not to_eos)

    texts: dict[str, list] = {}   # each apar-rt run's texts, the last run's

    def ours_in_flight():
        texts["flight"] = in_flight(llm, ids, params, bs)

    def ours_waves():
        texts["waves"] = [_served(o).text for w in waves
                          for o in llm.generate(prompt_token_ids=[ids[i] for i in w], params=params)]

    def one_round(r: int) -> tuple[float, float, float]:
        """The whole set three times back to back, each engine warm as it runs alone in a server:
        apar-rt in flight, the peer's waves, apar-rt's waves (the two apar-rt runs swap places every
        other round, the peer's stays between them). Returns the seconds of apar-rt in flight,
        apar-rt in waves and the peer."""
        took = {}
        for name, run in ([("flight", ours_in_flight), ("peer", lambda: run_peer(False)), ("waves", ours_waves)]
                          [::1 if r % 2 == 0 else -1]):
            t = time.perf_counter()
            run()
            took[name] = time.perf_counter() - t
        return took["flight"], took["waves"], took["peer"]

    one_round(0)   # warm both
    if texts["flight"] != texts["waves"]:   # greedy: a request's text does not depend on the load
        raise RuntimeError("apar-rt's APAR texts differ between the in-flight run and the waves")
    tc, ta, tb = (list(x) for x in zip(*(one_round(r) for r in range(repeats))))
    na = nb = len(ids)
    te = [0.0]

    def peer_eos():
        t = time.perf_counter()
        run_peer(True)
        te[0] = time.perf_counter() - t
        return len(ids)

    split = step_split(llm.engine, ours_in_flight)
    if texts["flight"] != texts["waves"]:
        raise RuntimeError("apar-rt's APAR texts differ between the timed passes and the step-split pass")
    peer_eos()
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"prompts": len(ids), "apar_max_tokens": max_tokens, "apar_max_num_seqs": seats,
            "apar_medusa_tree": medusa_tree,
            "apar_speculative_disable_by_batch_size": speculative_disable_by_batch_size if medusa_tree else None,
            "apar_rt_apar_req_s": na / statistics.median(tc), "apar_rt_apar_waves_req_s": na / ma,
            "peer_ar_req_s": nb / mb, "req_ratio": _round_ratio(tc, tb, na, nb),
            "req_ratio_waves": _round_ratio(ta, tb, na, nb),
            "mean_ar_answer_tokens": statistics.mean(ar_lens), "peer_ar_to_eos_req_s": len(ids) / te[0],
            **split}


def _medusa_column(row: dict) -> str:
    """The APAR runs' draft tree, '@N' after it with a speculative_disable_by_batch_size N; '-': none."""
    tree, limit = row.get("apar_medusa_tree"), row.get("apar_speculative_disable_by_batch_size")
    return "-" if not tree else tree if limit is None else f"{tree}@{limit}"


def format_rows(rows: list[dict], header: bool = True) -> str:
    head = (f"{'batch':>5} {'prompt':>6} {'apar-rt AR tok/s':>16} {PEER + ' AR tok/s':>26} {'ratio':>6}"
            f" {'apar-rt ms/step':>15} {PEER + ' ms/step':>25} {'ratio':>6}"
            f" {'apar-rt APAR req/s':>18} {PEER + ' AR req/s':>26} {'ratio':>6} {'waves':>6} {'seats':>5}"
            f" {'medusa':>8}")
    lines = [head] if header else []
    for r in rows:
        if r.get("decode_ratio") is not None:
            dec = f" {r['apar_rt_decode_ms']:>15.2f} {r['peer_decode_ms']:>25.2f} {r['decode_ratio']:>6.2f}"
        else:   # --max-tokens 1: no decode step
            dec = f" {'-':>15} {'-':>25} {'-':>6}"
        req = (f" {r['apar_rt_apar_req_s']:>18.2f} {r['peer_ar_req_s']:>26.2f} {r['req_ratio']:>6.2f}"
               f" {r['req_ratio_waves']:>6.2f} {r['apar_max_num_seqs']:>5} {_medusa_column(r):>8}"
               if "req_ratio" in r else "")
        lines.append(f"{r['batch']:>5} {r['input_len']:>6.0f} {r['apar_rt_ar_tok_s']:>16.1f} {r['peer_ar_tok_s']:>26.1f} "
                     f"{r['ar_ratio']:>6.2f}{dec}{req}")
        if "apar_rt_apar_step_ms" in r:
            lines.append(f"{'':>5} apar-rt APAR in flight: {r['apar_rt_apar_step_ms']:.2f} ms a step "
                         f"({r['apar_rt_apar_steps']} steps): forward {r['apar_rt_apar_forward_share']:.0%}, "
                         f"Medusa heads {r['apar_rt_apar_heads_share']:.0%}, "
                         f"engine {r['apar_rt_apar_engine_share']:.0%}")
    return "\n".join(lines)
