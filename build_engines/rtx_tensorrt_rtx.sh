#!/usr/bin/env bash
# TensorRT-RTX FP16 plan for RTX workstations (compute capability 8.6, 8.9, 12.0; Turing 7.5 with
# --gpu-targets 7.5). TensorRT-RTX builds ahead of time on the CPU: no GPU is needed here.
#   pip install tensorrt-rtx-cu13        # (in .[test]; `import tensorrt_rtx`)
#   build_engines/rtx_tensorrt_rtx.sh [MODEL] [OUT] [DEVICE]
# DEVICE (default rtx-4090) is the memory target: `--fit` sizes the KV pool for it and the build
# refuses a plan whose estimate (weights + activations at the largest profile + pool) exceeds it.
# Attention is the inlined ONNX function. A plugin (--plugin python, or the C++ library of plugins/)
# needs libtensorrt_rtx.so findable by the parser (plugins/README.md). The plan does not run on A100/H100/H200.
set -euo pipefail
MODEL=${1:-samples/models/apar-tiny}
OUT=${2:-build_engines/out/$(basename "$MODEL")-trt-rtx-fp16}
DEVICE=${3:-rtx-4090}
mkdir -p build_engines/out

apar-rt build \
  --model "$MODEL" \
  --output "$OUT" \
  --backend tensorrt \
  --dtype float16 \
  --max-batch-size 16 \
  --batch-buckets 1,2,4,8,16 \
  --max-num-tokens 1024 \
  --max-prefill-batch 1 \
  --block-size 16 \
  --fit "$DEVICE" \
  --check \
  --force
# Serve on an RTX GPU: apar-rt generate --engine "$OUT" --backend tensorrt "Give me 3 tips."
