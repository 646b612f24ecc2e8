"""`apar-rt build --check`: run a built engine on a mixed step and compare it with the torch reference.

The step holds a prefill chunk over cached context, a decode token, and a three-token draft
tree, over a KV pool filled with random values; the batch is padded to a bucket as at run
time. The reference is our torch model in float32 on the same inputs. The engine runs under
polygraphy where it is installed (`polygraphy run model.onnx --onnxrt` and, with TensorRT,
`polygraphy run model.plan --trt`), loading the reference outputs to compare with; without
polygraphy, onnxruntime runs in process. The report gives the largest absolute difference
per output; the inputs and outputs stay in the engine folder's check/ (not in the manifest).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apar_rt.build.manifest import ONNX_NAME, Manifest
from apar_rt.export import step_io

CHECK_DIR = "check"   # under the engine folder; not part of the manifest
# Largest acceptable |engine - reference| on the logits, by engine dtype.
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2.5e-1}


@dataclass(slots=True)
class RunnerDiff:
    runner: str                      # "onnxrt" or "trt"
    tool: str                        # "polygraphy" or "onnxruntime (in process)"
    max_abs: dict[str, float]        # per output
    command: str = ""                # the equivalent command line, when polygraphy ran
    ok: bool = True


@dataclass(slots=True)
class CheckReport:
    dtype: str
    tolerance: float
    runs: list[RunnerDiff] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)   # runners not run here, each with the reason

    @property
    def max_abs(self) -> float:
        return max((max(r.max_abs.values()) for r in self.runs), default=float("nan"))

    @property
    def passed(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs) and self.max_abs <= self.tolerance

    def summary(self) -> str:
        lines = []
        for r in self.runs:
            worst = max(r.max_abs, key=r.max_abs.get)
            lines.append(f"check [{r.runner} via {r.tool}]: "
                         f"largest |engine - torch| = {r.max_abs[worst]:.3g} "
                         f"(output {worst}; logits {r.max_abs['logits']:.3g}; tolerance {self.tolerance:g})")
            if r.command:
                lines.append(f"  reproduce: {r.command}")
        lines += [f"check [not run]: {why}" for why in self.not_run]
        lines.append("check passed" if self.passed else "check FAILED")
        return "\n".join(lines)


def check_step(cfg: dict, block_size: int, dtype: str, buckets: list[int], seed: int = 0):
    """Feeds (numpy, by input name) of a mixed step, padded to the smallest bucket that holds it."""
    from apar_rt.core import StepInput

    rng = np.random.default_rng(seed)
    hkv, d, n = int(cfg["num_key_value_heads"]), int(cfg["head_dim"]), int(cfg["num_hidden_layers"])
    V = int(cfg["vocab_size"])
    bs = block_size
    # sequence 0: 5-token prefill chunk after bs+1 cached tokens; 1: one decode token after 2*bs-1;
    # 2: a draft tree (root, two children of the root) after 3 cached tokens.
    lens = [(bs + 1, 5), (2 * bs - 1, 1), (3, 3)]
    B = min(3, max(buckets)) if buckets else 3
    lens = lens[:B]
    tables, next_block = [], 1
    blocks_needed = [-(-(c + q) // bs) for c, q in lens]
    max_blocks = max(blocks_needed)
    for nb in blocks_needed:
        tables.append(list(range(next_block, next_block + nb)) + [0] * (max_blocks - nb))
        next_block += nb
    num_blocks = next_block + 1
    T = sum(q for _, q in lens)
    max_q = max(q for _, q in lens)
    mask = np.zeros((T, max_q), bool)
    positions, qs, t = [], [0], 0
    for (c, q) in lens:
        if q == 3 and c == 3:            # the tree: root sees itself; each child sees the root and itself
            mask[t, 0] = True
            mask[t + 1, [0, 1]] = True
            mask[t + 2, [0, 2]] = True
            positions += [c, c + 1, c + 1]
        else:
            mask[t:t + q, :q] = np.tril(np.ones((q, q), bool))
            positions += list(range(c, c + q))
        t += q
        qs.append(t)
    slot = [tables[b][p // bs] * bs + p % bs for b, (c, q) in enumerate(lens) for p in range(c, c + q)]
    step = StepInput(input_ids=rng.integers(0, V, T).astype(np.int32),
                     positions=np.array(positions, np.int32), block_tables=np.array(tables, np.int32),
                     context_lens=np.array([c for c, _ in lens], np.int32),
                     query_start=np.array(qs, np.int32), mask=mask, slot_mapping=np.array(slot, np.int32),
                     logits_indices=np.arange(T, dtype=np.int32))
    bucket = step_io.pick_bucket(B, buckets) if buckets else None
    feeds = step_io.step_feeds(step, bucket).arrays
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype, np.float32)
    for i in range(n):
        for name in (step_io.k_cache_name(i), step_io.v_cache_name(i)):
            pool = rng.standard_normal((num_blocks, bs, hkv, d)).astype(np_dtype)
            pool[0] = 0.0
            feeds[name] = pool
    return feeds, bucket


def torch_reference(model_dir: str | Path, feeds: dict, num_layers: int, medusa: bool = False) -> dict:
    """The torch model's outputs (float32) for the feeds, by output name (the exported graph's names)."""
    import torch

    from apar_rt.export.onnx_export import _step_module
    from apar_rt.model.weights import load_model

    model, cfg = load_model(model_dir, dtype=torch.float32, device="cpu")
    heads = None
    if medusa:
        from apar_rt.medusa.heads import find_heads_dir, load_heads
        heads = load_heads(find_heads_dir(model_dir), hidden=cfg.hidden_size, vocab=cfg.vocab_size)
    graph = _step_module(model, heads)
    names = step_io.input_names(num_layers)
    args = [torch.from_numpy(np.asarray(feeds[k])) for k in names]
    args = args[:7] + [a.float() for a in args[7:]]
    with torch.inference_mode():
        outs = graph(*args)
    return {k: v.numpy() for k, v in zip(step_io.output_names(num_layers, heads is not None), outs)}


def _diffs(ref: dict, got: dict) -> dict[str, float]:
    return {k: float(np.max(np.abs(np.asarray(got[k], np.float32) - ref[k]))) if ref[k].size else 0.0
            for k in ref}


def _have_polygraphy() -> bool:
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return False
    return True


def _polygraphy(args: list[str], workdir: Path, ref: dict, feeds: dict, tolerance: float, runner: str,
                log, *, prelude: str = "", env: dict | None = None) -> RunnerDiff:
    """`polygraphy run ARGS --load-inputs --load-outputs(reference) --save-outputs`, then our max diffs."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    inputs, reference, saved = workdir / "inputs.json", workdir / "reference.json", workdir / f"{runner}.json"
    save_json([feeds], str(inputs))
    reference_run = [IterationResult(ref, runner_name="torch-reference")]
    RunResults([("torch-reference", reference_run)]).save(str(reference))
    argv = ["polygraphy", "run", *args, "--load-inputs", str(inputs), "--load-outputs", str(reference),
            "--save-outputs", str(saved), "--atol", str(tolerance), "--rtol", "0",
            "--check-error-stat", "max"]
    code = prelude + "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, *argv[1:]], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    if not saved.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError("polygraphy run failed:\n" + "\n".join(tail))
    results = RunResults.load(str(saved))
    runner_name, iters = [(n, r) for n, r in results.items() if n != "torch-reference"][0]
    got = {k: np.asarray(v) for k, v in iters[0].items()}
    return RunnerDiff(runner, "polygraphy", _diffs(ref, got), command=shlex.join(argv),
                      ok=proc.returncode == 0)


def _onnxruntime_in_process(onnx_path: Path, feeds: dict, ref: dict) -> RunnerDiff:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, feeds)))
    return RunnerDiff("onnxrt", "onnxruntime (in process)", _diffs(ref, got))


def _trt_not_runnable(engine: dict) -> str | None:
    """Why the plan cannot run here (None: it can)."""
    from apar_rt.trt.library import PlanNotForThisGPU, check_device
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"the {engine.get('library')} plan was built, but there is no CUDA GPU here to run it "
                f"(targets: compute capability {', '.join(engine.get('gpu_targets') or ())})")
    p = torch.cuda.get_device_properties(0)
    try:
        check_device(engine, f"{p.major}.{p.minor}", p.name)
    except PlanNotForThisGPU as e:
        return str(e)
    return None


def run_check(engine_dir: str | Path, model_dir: str | Path, manifest: Manifest, *, log=print) -> CheckReport:
    """Compare the engine folder's model (and TensorRT plan, where this GPU can run it) with the torch
    reference. The plan's plugin is loaded by the same contract as the builder and the backend
    (apar_rt.trt.plugin.load_plugin), in the polygraphy process."""
    engine_dir = Path(engine_dir)
    cfg = manifest.model_config
    n = int(cfg["num_hidden_layers"])
    feeds, bucket = check_step(cfg, manifest.block_size, manifest.dtype, manifest.batch_buckets)
    ref = torch_reference(model_dir, feeds, n, medusa=bool(manifest.medusa))
    report = CheckReport(manifest.dtype, TOLERANCE[manifest.dtype])
    onnx_path = engine_dir / manifest.onnx.get("file", ONNX_NAME)
    workdir = engine_dir / CHECK_DIR     # inputs, reference and engine outputs stay for reproduction
    workdir.mkdir(exist_ok=True)
    if manifest.dtype in ("float32", "float16"):   # onnxruntime's CPU provider has no bfloat16 kernels
        if _have_polygraphy():
            report.runs.append(_polygraphy([str(onnx_path), "--onnxrt"], workdir, ref, feeds,
                                           report.tolerance, "onnxrt", log))
        else:
            report.runs.append(_onnxruntime_in_process(onnx_path, feeds, ref))
    if manifest.engines:
        engine = manifest.engines[0]
        why = _trt_not_runnable(engine)
        if why:
            report.not_run.append(f"trt: {why}")
            return report
        max_q = int(feeds["mask"].shape[1])
        profile = next((p["index"] for p in engine["profiles"]
                        if p["batch"] == bucket and p["max_q"] >= max_q), None)
        if profile is None:
            report.not_run.append(f"trt: no profile of batch {bucket} takes {max_q} new tokens per sequence")
            return report
        args = [str(engine_dir / engine["file"]), "--model-type", "engine", "--trt",
                "--optimization-profile", str(profile)]
        if not _have_polygraphy():
            raise RuntimeError("--check of a TensorRT engine needs polygraphy (pip install polygraphy)")
        prelude = ""
        from apar_rt.trt.plugin import spec_of
        spec = spec_of(engine.get("plugin"))
        if spec:
            prelude = (f"from apar_rt.trt import library, plugin; plugin.load_plugin(library.load({engine['library']!r}), "
                       f"{spec!r}, expect_sha256={engine['plugin'].get('sha256')!r}); ")
        env = {"POLYGRAPHY_USE_TENSORRT_RTX": "1"} if engine.get("library") == "tensorrt_rtx" else {}
        report.runs.append(_polygraphy(args, workdir, ref, feeds, report.tolerance, "trt", log, prelude=prelude,
                                       env=env))
    return report
