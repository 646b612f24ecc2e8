#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's second command).
# torch==2.13.0 goes in first: it is a local CPU wheel; an unpinned torch would pull CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
# .[test] includes tensorrt-rtx-cu13 (TensorRT for RTX, ~100 MB): tests/test_tensorrt_build.py builds real plans with it.
python -m pip install -q -e ".[test]"
# tests/test_triton.py runs a real tritonserver: download and unpack it once (cached, ~10 s; runtime/README.md).
[[ "${APAR_SKIP_TRITON:-0}" == 1 ]] || PYTHON=python bash runtime/launch_tritonserver.sh --setup-only
python -m pytest -q "$@"
