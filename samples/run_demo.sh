#!/usr/bin/env bash
# The README's first command, on a fresh machine. In the virtualenv .venv (or $APAR_VENV), install
# everything the README uses (engine, server, clients, benchmarks); build the bundled demo model
# into an ONNX Runtime engine; generate with APAR beside the AR baseline and APAR + Medusa; then
# start `apar-rt serve` on the engine (127.0.0.1, a free port), stream a chat answer to the
# official `openai` client, and stop the server (also when something fails).
set -euo pipefail
cd "$(dirname "$0")/.."
. samples/venv.sh
APAR_ORT_OPS_OPTIONAL=1 apar_venv "onnx,serve,clients"   # the demo runs without the native op too
MODEL=samples/models/apar-tiny
ENGINE="${APAR_DEMO_ENGINE:-build_engines/out/apar-tiny-ort}"
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

echo "== apar-rt serve, and the openai client =="
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
apar-rt serve --engine "$ENGINE" --host 127.0.0.1 --port "$PORT" --log-level warning &
SERVER=$!
stop_server() {   # SIGTERM (uvicorn's graceful shutdown), SIGKILL after 10 s
  kill -TERM "$SERVER" 2>/dev/null || return 0
  ( sleep 10 && kill -KILL "$SERVER" ) >/dev/null 2>&1 &
  local guard=$!
  wait "$SERVER" 2>/dev/null || true
  kill "$guard" 2>/dev/null || true
}
trap stop_server EXIT
python - "$PORT" "$SERVER" <<'PY'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # an exited, not yet reaped server is a zombie (Linux)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True

deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    if not alive(pid):
        sys.exit("apar-rt serve exited before it was ready")
    time.sleep(0.2)
sys.exit("apar-rt serve was not ready after 120 s")
PY
python samples/clients/openai_client.py --url "http://127.0.0.1:$PORT/v1" --max-tokens 300 "$PROMPT"
stop_server
trap - EXIT
echo "== server stopped =="
