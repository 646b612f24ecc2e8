"""The native op library for tests: its path, or a skip where it is not built, or a failure where
the setup built it and it has gone ($APAR_RT_ORT_OPS_REQUIRED=1, set by samples/setup_and_test.sh)."""

from __future__ import annotations

import os
from pathlib import Path

REQUIRED_VAR = "APAR_RT_ORT_OPS_REQUIRED"


def library_or_skip() -> Path:
    import pytest

    from apar_rt.backends import ort_native

    lib = ort_native.library()
    if lib is None:
        if os.environ.get(REQUIRED_VAR) == "1":
            pytest.fail(f"the native op library is required here ({REQUIRED_VAR}=1) but absent: {ort_native.BUILT}")
        pytest.skip(f"native op library not built ({ort_native.BUILT}; python -m apar_rt.backends.ort_native)")
    return lib
