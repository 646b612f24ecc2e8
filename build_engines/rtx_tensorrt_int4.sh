#!/usr/bin/env bash
# Weight-only INT4 TensorRT-RTX engine for an RTX card (default: RTX 4090 24 GB), sized by the planner.
#   build_engines/rtx_tensorrt_int4.sh MODEL [DEVICE] [OUT]
# What ran where (2026-11-29): TensorRT-RTX builds ahead of time on the CPU, so this recipe's build
# step ran on the CI machine for a tiny checkpoint (tests/test_quantize_tensorrt.py: int4 and int8
# plans, INT4/INT8 DequantizeLinear layers feeding MatMuls). The plans run only on RTX-class GPUs
# (8.6, 8.9, 12.0); none has run one here. ONNX Runtime engines (--backend onnxruntime) use
# MatMulNBits instead and ran here (tests/test_quantize.py).
set -euo pipefail
MODEL=${1:?usage: rtx_tensorrt_int4.sh MODEL [DEVICE] [OUT]}
DEVICE=${2:-rtx-4090}
OUT=${3:-build_engines/out/$(basename "$MODEL")-trt-$DEVICE-int4}
mkdir -p build_engines/out
SHAPE=(--max-batch-size 16 --max-num-tokens 2048 --max-seq-len 4096 --block-size 16)

apar-rt plan --model "$MODEL" --device "$DEVICE" --quantize int4 "${SHAPE[@]}" --gpu-memory-utilization 0.9

apar-rt build \
  --model "$MODEL" \
  --output "$OUT" \
  --backend tensorrt \
  --dtype float16 \
  --quantize int4 --group-size 128 \
  --fit "$DEVICE" --gpu-memory-utilization 0.9 \
  "${SHAPE[@]}" \
  --timing-cache build_engines/out/rtx.timing.cache \
  --force
