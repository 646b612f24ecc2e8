"""The core (block pool, scheduler, APAR rules, core types) imports no heavy library."""

import subprocess
import sys


def test_core_imports_no_torch():
    code = ("import sys; import apar_rt, apar_rt.kv.block_pool, apar_rt.scheduler, apar_rt.apar, apar_rt.core, "
            "apar_rt.memory_plan;"
            "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"core modules imported {out}"
