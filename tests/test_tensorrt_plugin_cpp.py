"""The C++ TreePagedAttention plugin (plugins/) in a real TensorRT registry and build, on this CPU.

The library is built from plugins/ against TensorRT's public headers, which are fetched at build time
and never committed (plugins/README.md). Where it has not been built (CI: no headers), the tests that
need it skip and say so. $APAR_TRT_PLUGIN_LIB points at a library elsewhere.

What this proves with the library: it registers apar::TreePagedAttention version 1 through the one
loading contract (load_plugin), its creator declares the node's numeric attributes as fields and
refuses a bad head ratio, and `apar-rt build --plugin LIB` maps every attention node to a PLUGIN_V3
layer and serializes the library into the plan. The kernel-image test needs no library: the PTX the
plugin launches has the entry point, header and parameter count the C++ code assumes. Not proven
here: enqueue (it needs a GPU that can run the plan).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apar_rt.trt import library
from apar_rt.trt import plugin as P

ROOT = Path(__file__).resolve().parents[1]
BUILT = ROOT / "plugins" / "build" / "libapar_trt_plugins.so"
CPP_LIB = Path(os.environ.get("APAR_TRT_PLUGIN_LIB") or BUILT)
needs_lib = pytest.mark.skipif(
    not CPP_LIB.is_file(),
    reason=f"C++ plugin library not built ({CPP_LIB} is absent; it needs TensorRT's headers, see plugins/README.md)")
DEMO = ROOT / "samples" / "models" / "apar-tiny"


def _lib():
    try:
        return library.load()
    except library.TensorRTUnavailable as e:
        pytest.skip(f"no TensorRT library here ({e})")


def fields(trt, num_heads, num_kv_heads):
    return trt.PluginFieldCollection([
        trt.PluginField("num_heads", np.array([num_heads], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("num_kv_heads", np.array([num_kv_heads], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("head_size", np.array([64], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("block_size", np.array([16], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("scale", np.array([0.125], np.float32), trt.PluginFieldType.FLOAT32)])


@needs_lib
def test_library_registers_the_creator_with_the_nodes_fields():
    lib = _lib()
    trt = lib.module
    record = P.load_plugin(lib, str(CPP_LIB))
    assert record["kind"] == "library" and record["library"] == str(CPP_LIB.resolve())
    creator = P.find_creator(lib)
    assert [(f.name, f.type) for f in creator.field_names] == [
        (n, trt.PluginFieldType.INT32) for n in P.INT_FIELDS] + [(n, trt.PluginFieldType.FLOAT32)
                                                                 for n in P.FLOAT_FIELDS]
    plugin = creator.create_plugin("attn", fields(trt, 2, 1), trt.TensorRTPhase.BUILD)
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    assert (core.plugin_name, core.plugin_namespace, core.plugin_version) == ("TreePagedAttention", "apar", "1")
    assert creator.create_plugin("attn", fields(trt, 3, 2), trt.TensorRTPhase.BUILD) is None   # 3 % 2 != 0


@needs_lib
def test_build_maps_every_attention_node_to_the_cpp_plugin_and_serializes_it(tmp_path):
    lib = _lib()
    if not lib.rtx:
        pytest.skip("the TensorRT-RTX build runs on a CPU; full TensorRT needs a GPU to build")
    link = tmp_path / "rtx-link"
    link.mkdir()
    (link / library.RTX_CORE).symlink_to(library.rtx_parser_folder() / (library.RTX_CORE + ".1"))
    env = {**os.environ, "LD_LIBRARY_PATH": f"{link}:{os.environ.get('LD_LIBRARY_PATH', '')}", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "engine"
    r = subprocess.run([sys.executable, "-m", "apar_rt.cli", "build", "--model", str(DEMO), "--output", str(out),
                        "--backend", "tensorrt", "--plugin", str(CPP_LIB), "--max-batch-size", "1",
                        "--max-num-tokens", "16", "--max-seq-len", "64", "--max-draft-len", "0"],
                       capture_output=True, text=True, cwd=ROOT, check=False, timeout=600, env=env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    layers = json.loads((DEMO / "config.json").read_text())["num_hidden_layers"]
    assert f"attention: {layers} PLUGIN_V3 layers (apar::TreePagedAttention v1, library)" in log, log[-3000:]
    engine = json.loads((out / "manifest.json").read_text())["engines"][0]
    assert engine["attention"] == "plugin" and engine["plugin"]["library"] == str(CPP_LIB.resolve())
    assert engine["plugin"]["serialized_in_plan"] is True
    plan = (out / engine["file"]).read_bytes()
    assert b"getCreators" in plan and b"APAR_TRT_KERNEL_DIR" in plan     # the library itself is in the plan


def test_kernel_images_match_what_the_plugin_launches(tmp_path):
    """The PTX the C++ enqueue loads: entry `_tree_attention_kernel`, the `// apar-kernel:` header it
    parses, and 30 parameters (the kernel's 28 + Triton 3.9's two scratch pointers), as args[30] there."""
    from apar_rt.trt.plugin_kernels import file_name, write_kernels

    cfg = json.loads((DEMO / "config.json").read_text())
    shape = dict(num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                 head_size=cfg["head_dim"], block_size=16)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # conftest sets it; AOT needs it unset
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "apar_rt.trt.plugin_kernels", "--model", str(DEMO), "--cc", "89",
                        "--dtype", "float16", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       check=False, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    files = [Path(line) for line in r.stdout.split()]
    assert [f.name for f in files] == [file_name("float16", **shape, decode=d) for d in (True, False)]
    src = (ROOT / "plugins" / "tree_paged_attention_plugin.cpp").read_text()
    assert "void* args[30];" in src and '"_tree_attention_kernel"' in src
    for f in files:
        ptx = f.read_text()
        head = re.match(r"// apar-kernel: block_q=(\d+) block_m=(\d+) num_warps=(\d+) shared=(\d+)\n", ptx)
        assert head, ptx[:200]
        block_q, block_m, warps, _ = map(int, head.groups())
        assert block_m == block_q * (shape["num_heads"] // shape["num_kv_heads"]) and warps == 4
        assert f".reqntid {32 * warps}" in ptx and ".target sm_89" in ptx
        entry = ptx[ptx.index(".entry _tree_attention_kernel("):]
        assert entry[:entry.index(")")].count(".param") == 30
    with pytest.raises(ValueError, match="head size 48 is not supported"):
        write_kernels(tmp_path, 89, "float16", num_heads=2, num_kv_heads=1, head_size=48, block_size=16)
