#!/usr/bin/env bash
# Launch a real Triton Inference Server (2.51) on the apar model repository, without docker.
#
# The server binary comes from the nvidia-pytriton 0.7.0 wheel (55 MB, from PyPI). The first
# run downloads and unpacks it once into $APAR_TRITON_HOME (default ~/.cache/apar-rt/tritonserver-2.51);
# later runs reuse it. The wheel is unpacked, not pip-installed: only its tritonserver bundle
# is used, so its numpy pin never meets the environment that runs apar-rt.
#
# The Python backend's stub runs model.py with this Python's libpython and sys.path, so the
# model imports apar_rt (and torch) from the environment that has apar-rt installed.
#
# Usage:
#   runtime/launch_tritonserver.sh [--engine DIR | --model DIR] [--backend NAME] [--mode apar|ar]
#       [--param KEY=VALUE ...] [--repo-out DIR] [--http-port 8000] [--grpc-port 8001]
#       [--metrics-port 8002] [-- EXTRA TRITONSERVER ARGS]
#   runtime/launch_tritonserver.sh --setup-only     # download and unpack, then exit
#
# With --engine/--model (or --param/--backend/--mode), the model repository is copied to
# --repo-out (default: a new temporary folder) with those config.pbtxt parameters filled in;
# otherwise runtime/model_repository is served as it is.
# Environment: PYTHON (the interpreter with apar-rt; default python3), APAR_TRITON_HOME.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
PYTRITON_VERSION=0.7.0
TRITON_HOME="${APAR_TRITON_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/apar-rt/tritonserver-2.51}"

setup_only=0
http_port=8000
grpc_port=8001
metrics_port=8002
repo_out=""
params=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --setup-only) setup_only=1; shift ;;
    --engine|--model) params+=("engine_dir=$(cd "$2" && pwd)"); shift 2 ;;
    --backend) params+=("backend=$2"); shift 2 ;;
    --mode) params+=("mode=$2"); shift 2 ;;
    --param) params+=("$2"); shift 2 ;;
    --repo-out) repo_out="$2"; shift 2 ;;
    --http-port) http_port="$2"; shift 2 ;;
    --grpc-port) grpc_port="$2"; shift 2 ;;
    --metrics-port) metrics_port="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "launch_tritonserver.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

setup() {
  [[ -f "$TRITON_HOME/.ready" ]] && return 0
  mkdir -p "$TRITON_HOME"
  exec 9>"$TRITON_HOME/.lock"
  flock 9
  [[ -f "$TRITON_HOME/.ready" ]] && return 0
  local t0=$SECONDS
  echo "setting up tritonserver in $TRITON_HOME (once) ..." >&2
  "$PYTHON" -m pip download -q --no-deps "nvidia-pytriton==$PYTRITON_VERSION" -d "$TRITON_HOME/download"
  "$PYTHON" - "$TRITON_HOME" <<'PY'
import glob, os, shutil, stat, sys, zipfile
home = sys.argv[1]
wheel = glob.glob(os.path.join(home, "download", "nvidia_pytriton-*.whl"))[0]
for d in ("tritonserver", "nvidia_pytriton.libs"):
    shutil.rmtree(os.path.join(home, d), ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if name.startswith("pytriton/tritonserver/"):
            dest = os.path.join(home, name[len("pytriton/"):])
        elif name.startswith("nvidia_pytriton.libs/"):
            dest = os.path.join(home, name)
        else:
            continue
        if name.endswith("/"):
            os.makedirs(dest, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
        mode = info.external_attr >> 16
        if mode:
            os.chmod(dest, stat.S_IMODE(mode))
PY
  chmod +x "$TRITON_HOME/tritonserver/bin/tritonserver"
  rm -rf "$TRITON_HOME/download"
  touch "$TRITON_HOME/.ready"
  echo "tritonserver set up in $((SECONDS - t0)) s" >&2
}

setup
flock -u 9 2>/dev/null || true

# The stub must match this Python's version; it runs model.py with this Python's libpython.
read -r PYVER LIBDIR < <("$PYTHON" -c 'import sys, sysconfig
print(f"{sys.version_info[0]}.{sys.version_info[1]}", sysconfig.get_config_var("LIBDIR"))')
stub="$TRITON_HOME/tritonserver/python_backend_stubs/$PYVER/triton_python_backend_stub"
if [[ ! -f "$stub" ]]; then
  echo "launch_tritonserver.sh: no Python backend stub for Python $PYVER in nvidia-pytriton $PYTRITON_VERSION" >&2
  exit 1
fi
dest="$TRITON_HOME/tritonserver/backends/python/triton_python_backend_stub"
if ! cmp -s "$stub" "$dest"; then   # a running server may hold the old one: replace, not overwrite
  cp "$stub" "$dest.tmp.$$" && chmod +x "$dest.tmp.$$" && mv -f "$dest.tmp.$$" "$dest"
fi

# The stub runs model.py with the libpython found on LD_LIBRARY_PATH, ignoring PYTHONPATH; it
# takes sys.prefix from the `python3` first on PATH. Its C++ side was built against numpy 1.x
# and misreads numpy 2 arrays (string tensors arrive corrupted). So the stub gets a small venv
# of its own holding numpy<2, whose .pth then adds this Python's own paths (torch, apar_rt, ...).
venv="$TRITON_HOME/stub-venv-py$PYVER"
if [[ ! -f "$venv/.ready" ]]; then
  exec 9>"$TRITON_HOME/.lock"
  flock 9
  if [[ ! -f "$venv/.ready" ]]; then
    t0=$SECONDS
    rm -rf "$venv"
    "$PYTHON" -m venv --without-pip "$venv"
    "$PYTHON" -m pip install -q --no-deps --target "$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "numpy>=1.26,<2"
    touch "$venv/.ready"
    echo "the stub's venv (numpy<2) set up in $((SECONDS - t0)) s" >&2
  fi
  flock -u 9
fi
"$PYTHON" - "$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "$ROOT" <<'PY'
import os, sys, sysconfig
venv_site, root = sys.argv[1], sys.argv[2]
stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
lines = []
for p in sys.path:
    if not p or not os.path.isdir(p) or os.path.realpath(p) in stdlib or "lib-dynload" in p or p.endswith(".zip"):
        continue
    if os.path.basename(p) in ("site-packages", "dist-packages"):
        lines.append(f"import site; site.addsitedir({p!r})")   # runs its .pth files too
    else:
        lines.append(p)
lines.append(root)
with open(os.path.join(venv_site, "apar_rt_env.pth"), "w") as f:
    f.write("\n".join(lines) + "\n")
PY

if [[ $setup_only == 1 ]]; then
  echo "$TRITON_HOME"
  exit 0
fi

repo="$HERE/model_repository"
temp_repo=""
if [[ ${#params[@]} -gt 0 ]]; then
  if [[ -z "$repo_out" ]]; then   # a temporary repository, removed when the server exits
    repo_out="$(mktemp -d -t apar-triton-repo.XXXXXX)"
    temp_repo="$repo_out"
  fi
  rm -rf "$repo_out/apar"
  mkdir -p "$repo_out"
  cp -r "$HERE/model_repository/apar" "$repo_out/apar"
  "$PYTHON" - "$repo_out/apar/config.pbtxt" "${params[@]}" <<'PY'
import re, sys
path, pairs = sys.argv[1], sys.argv[2:]
text = open(path).read()
for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
        sys.exit(f"--param wants KEY=VALUE, got {pair!r}")
    pattern = re.compile(r'(parameters\s*\{\s*key:\s*"%s"\s*value:\s*\{\s*string_value:\s*)"[^"]*"' % re.escape(key))
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    text, n = pattern.subn(lambda m: m.group(1) + quoted, text)
    if n == 0:
        text += f'parameters {{ key: "{key}" value: {{ string_value: {quoted} }} }}\n'
open(path, "w").write(text)
PY
  repo="$repo_out"
  echo "model repository: $repo" >&2
fi

export LD_LIBRARY_PATH="$LIBDIR:$TRITON_HOME/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$venv/bin:$PATH"
server=("$TRITON_HOME/tritonserver/bin/tritonserver"
  --model-repository "$repo"
  --backend-directory "$TRITON_HOME/tritonserver/backends"
  --cache-directory "$TRITON_HOME/tritonserver/caches"
  --http-address 127.0.0.1 --grpc-address 127.0.0.1 --metrics-address 127.0.0.1
  --http-port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port" --exit-timeout-secs 10
  "${extra[@]}")
if [[ -z "$temp_repo" ]]; then
  exec "${server[@]}"
fi
# The temporary repository outlives the server by nothing: run the server as a child, pass it
# SIGINT/SIGTERM, and remove the folder when it has exited.
"${server[@]}" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
trap 'rm -rf "$temp_repo"' EXIT
set +e
while true; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break    # wait returned for a trapped signal: wait on
done
exit "$rc"
