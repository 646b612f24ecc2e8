"""The README's first command in a fresh virtualenv: samples/run_demo.sh installs everything,
builds the demo engine, generates, and ends with `apar-rt serve` streaming a chat answer to the
official openai client, equal to the torch backend's greedy answer; the server is then stopped.

Slow (a fresh virtualenv: about a minute of pip, from pip's cache), but it runs in CI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Give me 3 tips for better sleep."


@pytest.mark.slow
def test_run_demo_in_a_fresh_venv_ends_with_a_served_streamed_answer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(APAR_VENV=str(tmp_path / "venv"), APAR_DEMO_ENGINE=str(tmp_path / "engine"))
    r = subprocess.run(["bash", str(ROOT / "samples/run_demo.sh"), PROMPT], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert (tmp_path / "venv/bin/apar-rt").is_file(), "the script was meant to install into its virtualenv"
    out = r.stdout
    assert out.rstrip().endswith("== server stopped ==")
    streamed = out.split("== streamed: ", 1)[1].split("\n== branches, as they grow:", 1)[0]

    from apar_rt import LLM, SamplingParams

    m = json.loads((tmp_path / "engine/manifest.json").read_text())
    oracle = LLM(str(ROOT / "samples/models/apar-tiny"), backend="torch", dtype="float32", device="cpu",
                 block_size=m["block_size"], max_num_seqs=m["max_batch_size"], max_num_tokens=m["max_num_tokens"])
    want = oracle.generate([PROMPT], SamplingParams(max_tokens=300))[0].text
    assert streamed == want
    assert len(want.split()) > 10, "the demo model was meant to answer with a few sentences"
