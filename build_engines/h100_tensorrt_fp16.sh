#!/usr/bin/env bash
# TensorRT FP16 engine for one H100 (TensorRT 10.x, CUDA 12), checked with polygraphy --trt.
#   build_engines/h100_tensorrt_fp16.sh MODEL [OUT] [PLUGIN_LIB]
# Build on the GPU that will serve: TensorRT engines are tied to the GPU and TensorRT version.
# With PLUGIN_LIB (the TreePagedAttention IPluginV3, see plugins/README.md) and TensorRT >= 10.7
# attention runs in the plugin; without it TensorRT inlines the ONNX local function. The build
# log says which one you got.
set -euo pipefail
MODEL=${1:?usage: h100_tensorrt_fp16.sh MODEL [OUT] [PLUGIN_LIB]}
OUT=${2:-build_engines/out/$(basename "$MODEL")-trt-h100-fp16}
PLUGIN=${3:-}
mkdir -p build_engines/out

args=(
  --model "$MODEL"
  --output "$OUT"
  --backend tensorrt
  --dtype float16
  --max-batch-size 64
  --batch-buckets 1,2,4,8,16,32,64
  --max-num-tokens 4096
  --max-seq-len 4096
  --block-size 16
  --max-num-blocks 65536
  --workspace 8
  --timing-cache build_engines/out/h100.timing.cache
  --check
  --force
)
if [[ -n "$PLUGIN" ]]; then args+=(--plugin-lib "$PLUGIN"); fi
apar-rt build "${args[@]}"
# Serve: apar-rt generate --engine "$OUT" --backend tensorrt "Give me 3 tips."
