#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (the README's second command).
# torch==2.13.0 goes in first: it is a local CPU wheel; an unpinned torch would pull CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pytest -q "$@"
