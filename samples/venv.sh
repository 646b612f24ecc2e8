# Sourced by samples/run_demo.sh and samples/setup_and_test.sh: `apar_venv EXTRAS` creates the
# project's virtualenv once, activates it, installs torch==2.13.0 first (pinned: a local CPU
# wheel; an unpinned torch would pull GBs of CUDA packages), then apar-rt (editable) with EXTRAS.
#   APAR_VENV  where the virtualenv lives (default: .venv in the repository, git-ignored)
#   PYTHON     the interpreter that creates it (default: python3)
#   APAR_ORT_OPS_OPTIONAL=1  go on without the native op library when it cannot be built
apar_venv() {
  local venv="${APAR_VENV:-.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating the virtualenv $venv (set APAR_VENV to put it elsewhere)" >&2
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  echo "setup: installing into $VIRTUAL_ENV (activate it later with: . $venv/bin/activate)" >&2
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[$1]"
  # the onnxruntime CPU backend's native decode op (apar_rt/backends/ort_native.py): compiled with
  # g++ against ONNX Runtime's API headers, fetched from Debian's package archive (pinned, sha256)
  python -m apar_rt.backends.ort_native --if-stale ${APAR_ORT_OPS_OPTIONAL:+--optional} >&2
}
