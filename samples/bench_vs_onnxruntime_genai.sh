#!/usr/bin/env bash
# apar-rt's onnxruntime engine against onnxruntime-genai on this CPU, side by side, on three models:
#   demo    samples/models/apar-tiny (hidden 128, 4 layers): AR tokens/s, and APAR + its Medusa
#           heads (the 4-deep chain) on the held-out prompts against the peer's AR requests/s;
#   wide    the demo widened to hidden 512 and 8 layers (`apar-rt bench widen`: the demo's exact
#           answers and heads at a dense 26M-parameter model's cost a token): the same rows;
#   random  a random Llama of hidden 512, 8 layers, 8 heads, vocabulary 32,000: AR tokens/s;
# then `apar-rt bench overhead` (the engine's own cost a step, random logits, no model).
# Each engine and the peer's model (built by onnxruntime-genai's own builder from the same HF folder)
# are made once under OUT and reused. Every `bench generate` alternates the two engines round by
# round and prints the median of the rounds' ratios; read ratios, not times, on a shared machine.
#
#   bash samples/bench_vs_onnxruntime_genai.sh [OUT] [demo|wide|random|overhead ...]
#     OUT      where engines and results go (default: build_engines/out/bench, git-ignored)
#     rows     which benchmarks to run (default: all four); results: OUT/<row>.txt (the table) and,
#              for the engine pairs, OUT/<row>.json
#   THREADS=1 (intra-op threads of both engines), REPEATS=5 (rounds; the wide model takes 3)
# About 20 minutes on a 2-vCPU machine, most of it the wide model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-build_engines/out/bench}"
shift || true
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(demo wide random overhead)
for row in "${ROWS[@]}"; do
  case "$row" in
    demo|wide|random|overhead) ;;
    *) echo "unknown benchmark '$row': choose from demo, wide, random, overhead" >&2; exit 2 ;;
  esac
done
. samples/venv.sh
apar_venv "onnx,peer"
THREADS="${THREADS:-1}"
REPEATS="${REPEATS:-5}"
mkdir -p "$OUT"

engine() {   # engine MODEL DIR: an onnxruntime engine of MODEL in DIR, built once
  [ -f "$2/manifest.json" ] || apar-rt build --model "$1" --output "$2" --backend onnxruntime --max-batch-size 128
}

peer_rows() {   # peer_rows NAME MODEL ENGINE REPEATS [bench generate flags...]
  local name=$1 model=$2 eng=$3 repeats=$4
  shift 4
  echo "== $name: apar-rt against onnxruntime-genai ($model) ==" >&2
  apar-rt bench generate --model "$model" --engine "$eng" --peer onnxruntime-genai --peer-dir "$OUT/peer-$name" \
      --threads "$THREADS" --batch-sizes 1,8,32 --max-tokens 64 --repeats "$repeats" --json "$@" \
      > "$OUT/$name.json" 2> >(tee "$OUT/$name.txt" >&2)
}

# the APAR rows: the held-out prompts, the 4-deep Medusa chain, no tree after a step of 32 sequences
APAR=(--prompts samples/prompts/heldout.jsonl --apar-max-tokens 256 --apar-medusa-tree chain_4
      --apar-speculative-disable-by-batch-size 32)

for row in "${ROWS[@]}"; do
  case "$row" in
    demo)
      engine samples/models/apar-tiny "$OUT/demo-ort"
      peer_rows demo samples/models/apar-tiny "$OUT/demo-ort" "$REPEATS" "${APAR[@]}" ;;
    wide)
      [ -f "$OUT/wide/config.json" ] || apar-rt bench widen --model samples/models/apar-tiny --output "$OUT/wide" \
          --hidden-size 512 --num-layers 8
      engine "$OUT/wide" "$OUT/wide-ort"
      peer_rows wide "$OUT/wide" "$OUT/wide-ort" "${WIDE_REPEATS:-3}" "${APAR[@]}" ;;
    random)
      [ -f "$OUT/random/config.json" ] || python -c "
import sys
from apar_rt.testing.tiny_model import RANDOM_LLAMA_512, make_tiny_checkpoint
make_tiny_checkpoint(sys.argv[1], **RANDOM_LLAMA_512, max_position_embeddings=2048)" "$OUT/random"
      engine "$OUT/random" "$OUT/random-ort"
      peer_rows random "$OUT/random" "$OUT/random-ort" "$REPEATS" ;;
    overhead)
      echo "== the engine's own cost a step (apar-rt bench overhead) ==" >&2
      apar-rt bench overhead | tee "$OUT/overhead.txt" >&2 ;;
  esac
done
echo "results in $OUT: ${ROWS[*]/%/.txt}" >&2
