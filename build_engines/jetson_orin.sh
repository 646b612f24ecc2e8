#!/usr/bin/env bash
# Weight-only INT4 (or INT8) TensorRT engine for Jetson Orin, sized by the memory planner.
#   build_engines/jetson_orin.sh MODEL [DEVICE] [QUANT] [OUT]
#   DEVICE: orin-nano-8gb | orin-nx-16gb | agx-orin-64gb (default orin-nano-8gb); QUANT: int4 | int8
# What ran where (2026-11-29):
# * `apar-rt plan` and `--fit` are pure arithmetic: they ran on the CI machine (a 7B plan is in
#   build_engines/README.md). `--quantize int4|int8 --backend tensorrt` was built here by TensorRT-RTX
#   1.7 for a tiny checkpoint (tests/test_quantize_tensorrt.py); nothing has run on a Jetson.
# * On the device (JetPack 6.x, TensorRT 10.3) the build must run on the Jetson itself; TensorRT 10.x
#   has INT4/INT8 weight-only (blocked DequantizeLinear into MatMul). TensorRT engines are symmetric.
# * Orin has 8-64 GB shared by CPU and GPU: the planner reserves ~1.5-3 GiB for JetPack; a 7B model
#   fits an Orin Nano 8 GB only at int4, with --max-num-tokens 512 and a short --max-seq-len.
set -euo pipefail
MODEL=${1:?usage: jetson_orin.sh MODEL [DEVICE] [QUANT] [OUT]}
DEVICE=${2:-orin-nano-8gb}
QUANT=${3:-int4}
OUT=${4:-build_engines/out/$(basename "$MODEL")-trt-$DEVICE-$QUANT}
mkdir -p build_engines/out
SHAPE=(--max-batch-size 4 --max-num-tokens 512 --max-seq-len 2048 --block-size 16)

# 1. What the device holds (fails, naming the numbers, if the model cannot fit even at int4).
apar-rt plan --model "$MODEL" --device "$DEVICE" --quantize "$QUANT" "${SHAPE[@]}"

# 2. The engine, its KV pool limit set by the same arithmetic (--fit).
apar-rt build \
  --model "$MODEL" \
  --output "$OUT" \
  --backend tensorrt \
  --dtype float16 \
  --quantize "$QUANT" --group-size 128 \
  --fit "$DEVICE" --kv-cache-fraction 0.9 \
  "${SHAPE[@]}" \
  --workspace 1 \
  --timing-cache build_engines/out/orin.timing.cache \
  --force
