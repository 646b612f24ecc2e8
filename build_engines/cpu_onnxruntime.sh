#!/usr/bin/env bash
# CPU engine with ONNX Runtime (float32), checked against the torch reference.
#   build_engines/cpu_onnxruntime.sh [MODEL] [OUT]
# Then: apar-rt generate --engine OUT "Give me 3 tips for better sleep."
set -euo pipefail
MODEL=${1:-samples/models/apar-tiny}
OUT=${2:-build_engines/out/$(basename "$MODEL")-ort-cpu}

apar-rt build \
  --model "$MODEL" \
  --output "$OUT" \
  --backend onnxruntime \
  --dtype float32 \
  --max-batch-size 16 \
  --batch-buckets 1,2,4,8,16 \
  --max-num-tokens 2048 \
  --block-size 16 \
  --check \
  --force
