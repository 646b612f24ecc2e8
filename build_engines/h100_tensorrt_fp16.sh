#!/usr/bin/env bash
# Full TensorRT FP16 plan for one H100 or H200 (TensorRT 10.x, CUDA 12), checked with polygraphy --trt.
#   build_engines/h100_tensorrt_fp16.sh MODEL [OUT] [DEVICE] [PLUGIN]
# DEVICE: h100-80gb (default) or h200. Build on that GPU: full TensorRT plans are tied to the GPU
# and TensorRT version (the manifest records both, and the backend refuses another GPU).
# PLUGIN: `python` (apar-rt's Python IPluginV3, which launches the Triton kernel of
# apar_rt/kernels/tree_attention.py) or a C++ library registering apar::TreePagedAttention;
# without it TensorRT inlines the ONNX function. The build log says which one you got.
# Sizes: prefill runs one sequence at a time (--max-prefill-batch 1) with chunks of 2048 tokens, so
# the inlined function's padded scores stay ~4 GiB for a 7B model; `--fit` gives the rest to the pool.
# See the estimate first with --dry-run (needs only MODEL/config.json).
set -euo pipefail
MODEL=${1:?usage: h100_tensorrt_fp16.sh MODEL [OUT] [DEVICE] [PLUGIN]}
OUT=${2:-build_engines/out/$(basename "$MODEL")-trt-h100-fp16}
DEVICE=${3:-h100-80gb}
PLUGIN=${4:-}
mkdir -p build_engines/out

args=(
  --model "$MODEL"
  --output "$OUT"
  --backend tensorrt
  --dtype float16
  --max-batch-size 64
  --batch-buckets 1,2,4,8,16,32,64
  --max-num-tokens 2048
  --max-prefill-batch 1
  --max-seq-len 4096
  --block-size 16
  --fit "$DEVICE"
  --workspace 8
  --timing-cache build_engines/out/h100.timing.cache
  --check
  --force
)
if [[ -n "$PLUGIN" ]]; then args+=(--plugin "$PLUGIN"); fi
apar-rt build "${args[@]}"
# Serve: apar-rt generate --engine "$OUT" --backend tensorrt "Give me 3 tips."
