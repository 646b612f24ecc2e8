"""The native op library for tests: its path, or a skip where it is not built, or a failure where
the setup built it and it has gone ($APAR_RT_ORT_OPS_REQUIRED=1, set by samples/setup_and_test.sh)."""

from __future__ import annotations

import os
from pathlib import Path

REQUIRED_VAR = "APAR_RT_ORT_OPS_REQUIRED"


def _absent(required: str, skip: str) -> None:
    """A failure saying `required` where the setup built the library ($APAR_RT_ORT_OPS_REQUIRED=1),
    else a skip saying `skip`."""
    import pytest

    if os.environ.get(REQUIRED_VAR) == "1":
        pytest.fail(required)
    pytest.skip(skip)


def library_or_skip() -> Path:
    from apar_rt.backends import ort_native

    lib = ort_native.library()
    if lib is None:
        _absent(f"the native op library is required here ({REQUIRED_VAR}=1) but absent: {ort_native.BUILT}",
                f"native op library not built ({ort_native.BUILT}; python -m apar_rt.backends.ort_native)")
    return lib


_BASELINE: dict[str, Path] = {}


def baseline_library_or_skip() -> Path:
    """The native op library built for the x86-64 baseline (SSE2: the kernel's four-lane vectors,
    as on aarch64), compiled once per test run from the cached headers; a skip where the library
    the setup built is that one already (this CPU lacks x86-64-v3, or it is not x86-64), or where
    no headers are cached (a failure with $APAR_RT_ORT_OPS_REQUIRED=1)."""
    import atexit
    import shutil
    import tempfile

    import pytest

    from apar_rt.backends import ort_native

    if "lib" not in _BASELINE:
        library_or_skip()
        if ort_native.cpu_target() != "x86-64-v3":
            pytest.skip("the built library is this CPU's baseline build already")
        include = ort_native.cached_headers(fetch=False)
        if include is None:
            _absent(f"no cached ONNX Runtime headers ({ort_native.HEADERS_CACHE}) to build the baseline variant",
                    f"no cached ONNX Runtime headers ({ort_native.HEADERS_CACHE})")
        folder = tempfile.mkdtemp(prefix="apar-ort-baseline-")
        atexit.register(shutil.rmtree, folder, True)
        _BASELINE["lib"] = ort_native.build(Path(folder) / "libapar_ort_ops_baseline.so", include,
                                            log=lambda m: None, march="")
    return _BASELINE["lib"]
