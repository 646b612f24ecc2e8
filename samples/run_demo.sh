#!/usr/bin/env bash
# The main job on a fresh machine (the README's first command): set up, build the bundled demo
# model into an ONNX Runtime engine, and generate with APAR beside the AR baseline and APAR+Medusa.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0          # first, pinned: the local CPU wheel, no CUDA downloads
python -m pip install -q -e ".[onnx]"
MODEL=samples/models/apar-tiny
ENGINE=build_engines/out/apar-tiny-ort
PROMPT="${1:-Give me 4 tips for staying healthy.}"
apar-rt build --model "$MODEL" --output "$ENGINE" --backend onnxruntime --force
echo "== APAR (onnxruntime engine) =="
apar-rt generate --engine "$ENGINE" --mode apar --max-tokens 300 "$PROMPT"
echo "== AR baseline (same engine, [Fork] banned) =="
apar-rt generate --engine "$ENGINE" --mode ar --max-tokens 300 "$PROMPT"
if [ -d "$MODEL/medusa" ]; then
  echo "== APAR + Medusa draft trees =="
  apar-rt generate --engine "$ENGINE" --mode apar --medusa --max-tokens 300 "$PROMPT"
fi
