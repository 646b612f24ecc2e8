#!/usr/bin/env bash
# Set up a fresh machine and run the main job: generate with APAR on the bundled demo model,
# side by side with the AR baseline. (The README's first command.)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0          # first, pinned: the local CPU wheel, no CUDA downloads
python -m pip install -q -e ".[onnx]"
MODEL=samples/models/apar-tiny
if [ ! -f "$MODEL/config.json" ]; then
  echo "demo model not found; making a tiny random checkpoint in /tmp/apar-tiny-random" >&2
  python -c "from apar_rt.testing.tiny_model import make_tiny_checkpoint as m; m('/tmp/apar-tiny-random')"
  MODEL=/tmp/apar-tiny-random
fi
PROMPT="Give me 4 tips for staying healthy."
echo "== APAR =="
apar-rt generate --model "$MODEL" --mode apar --max-tokens 200 "$PROMPT"
echo "== AR baseline =="
apar-rt generate --model "$MODEL" --mode ar --max-tokens 200 "$PROMPT"
