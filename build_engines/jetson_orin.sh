#!/usr/bin/env bash
# TensorRT FP16 engine for Jetson Orin (JetPack 6.x: TensorRT 10.3), built on the device itself.
#   build_engines/jetson_orin.sh MODEL [OUT] [DEVICE]     (DEVICE: orin-nano-8gb, orin-nx-16gb, agx-orin-64gb)
# Notes:
# * Orin has 8-64 GB of memory shared by CPU and GPU: keep batch and KV pool small; a 7B model in
#   FP16 (~13.5 GB) needs the 32/64 GB modules. INT8/INT4 weight-only quantization is not
#   implemented by apar-rt build yet (see build_engines/README.md).
# * TensorRT 10.3 has no plugin override for local functions: attention is the inlined ONNX
#   function (the build log reports "function"); Python plugins (tensorrt.plugin) are absent too.
# * `--fit DEVICE` sizes the KV pool for the module's shared memory and refuses a plan whose estimate
#   does not fit; `--dry-run` prints the estimate without building.
# * Export on a bigger host if the Jetson lacks memory for torch: copy the engine folder's
#   model.onnx across and build there; the manifest check needs the whole folder, so simplest
#   is to run this script on the device.
set -euo pipefail
MODEL=${1:?usage: jetson_orin.sh MODEL [OUT] [DEVICE]}
OUT=${2:-build_engines/out/$(basename "$MODEL")-trt-orin-fp16}
mkdir -p build_engines/out

apar-rt build \
  --model "$MODEL" \
  --output "$OUT" \
  --backend tensorrt \
  --dtype float16 \
  --max-batch-size 8 \
  --batch-buckets 1,2,4,8 \
  --max-num-tokens 512 \
  --max-prefill-batch 1 \
  --max-seq-len 2048 \
  --block-size 16 \
  --fit "${3:-agx-orin-64gb}" \
  --workspace 2 \
  --timing-cache build_engines/out/orin.timing.cache \
  --force
