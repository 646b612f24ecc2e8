#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's second command), in the virtualenv
# .venv (or $APAR_VENV): torch==2.13.0 first (a local CPU wheel), then apar-rt with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
. samples/venv.sh
# .[test] includes tensorrt-rtx-cu13 (TensorRT for RTX, ~100 MB): tests/test_tensorrt_build.py builds real plans with it.
apar_venv "test"
# the native op library was built above: its tests must run, not skip (apar_rt/testing/native.py)
[[ "${APAR_ORT_OPS_OPTIONAL:-0}" == 1 ]] || export APAR_RT_ORT_OPS_REQUIRED=1
# tests/test_triton.py runs a real tritonserver: download and unpack it once (cached, ~10 s; runtime/README.md).
[[ "${APAR_SKIP_TRITON:-0}" == 1 ]] || PYTHON=python bash runtime/launch_tritonserver.sh --setup-only
python -m pytest -q "$@"
