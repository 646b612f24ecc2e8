"""The CUDA paths' host-side logic on the CPU, their errors, and the GPU check's dry run.

What needs a GPU (graph capture, the kernel on the device) runs in
`python -m apar_rt.bench.gpu_check` on a lent GPU; its dry run below executes every section's
code on tiny sizes here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from apar_rt.backends.cuda_step import StepBuffers, is_plain_decode
from apar_rt.core import StepInput


def _step(T, B, max_q, width, seed=0):
    rng = np.random.default_rng(seed)
    i32 = lambda *s: rng.integers(0, 1000, s).astype(np.int32)  # noqa: E731
    return StepInput(input_ids=i32(T), positions=i32(T), block_tables=i32(B, width), context_lens=i32(B),
                     query_start=np.sort(i32(B + 1)), mask=rng.random((T, max_q)) < 0.5, slot_mapping=i32(T),
                     logits_indices=i32(B))


def test_step_buffers_round_trip_every_field_and_reuse_storage():
    buf = StepBuffers(torch.device("cpu"))
    big = _step(40, 5, 9, 7, seed=1)
    views = buf.upload(big)
    for name in StepBuffers.FIELDS + ("block_tables", "mask"):
        assert np.array_equal(views[name].numpy(), getattr(big, name)), name
    storage = buf.dev.data_ptr()
    small = _step(6, 2, 3, 4, seed=2)           # a smaller step reuses the same device storage
    views = buf.upload(small)
    assert buf.dev.data_ptr() == storage
    for name in StepBuffers.FIELDS + ("block_tables", "mask"):
        assert np.array_equal(views[name].numpy(), getattr(small, name)), name


def test_plain_decode_detection():
    B = 4
    dec = StepInput(input_ids=np.zeros(B, np.int32), positions=np.zeros(B, np.int32),
                    block_tables=np.zeros((B, 2), np.int32), context_lens=np.zeros(B, np.int32),
                    query_start=np.arange(B + 1, dtype=np.int32), mask=np.ones((B, 1), bool),
                    slot_mapping=np.zeros(B, np.int32), logits_indices=np.arange(B, dtype=np.int32))
    assert is_plain_decode(dec)
    tree = _step(10, 4, 5, 2)
    assert not is_plain_decode(tree)


def test_device_cuda_without_a_gpu_is_a_clear_error(tiny_gqa):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from apar_rt.backends import BackendUnavailable
    from apar_rt.backends.device import resolve_device

    with pytest.raises(BackendUnavailable, match=r"--device cuda: no CUDA GPU is visible.*use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'; use cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    path, _, _ = tiny_gqa
    out = subprocess.run([sys.executable, "-m", "apar_rt.cli", "generate", "--model", str(path), "--device",
                          "cuda:1", "--max-tokens", "2", "hi"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no CUDA GPU is visible" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_gpu_check_dry_run_exercises_every_section(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "apar_rt.bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = data["sections"]
    assert set(sections) == {"bandwidth", "kernel_accuracy", "oracles", "attention", "sampler", "decode_steps"}
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert sections["kernel_accuracy"]["all_pass"]
    assert sections["oracles"]["ar_pass"] and sections["oracles"]["apar_pass"]
    assert sections["sampler"]["all_pass"] and sections["sampler"]["rows_checked"] > 200
    assert len(sections["decode_steps"]["rows"]) == 6
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "decode step" in out.stdout.splitlines()[-12:][0] or "decode step" in out.stdout
