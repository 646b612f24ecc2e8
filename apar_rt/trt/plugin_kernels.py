"""Kernel images for the C++ TreePagedAttention plugin (plugins/tree_paged_attention_plugin.cpp).

The plugin's enqueue launches the same Triton kernel as the torch backend
(`apar_rt.kernels.tree_attention._tree_attention_kernel`), compiled ahead of time to PTX by
`apar_rt.kernels.aot` (no GPU needed). It needs one image per (dtype, heads, KV heads, head size,
block size) and tile shape: `decode` (the tile `plan_launch` picks when a step has at most two new
tokens per sequence) and `prefill`. The plugin runs one context split, so no scratch buffer.

Each file's first line is a PTX comment the plugin parses:
`// apar-kernel: block_q=Q block_m=M num_warps=W shared=BYTES`.

    python -m apar_rt.trt.plugin_kernels --model DIR --cc 89 --dtype float16 --out build/kernels
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32")


def file_name(dtype: str, num_heads: int, num_kv_heads: int, head_size: int, block_size: int, decode: bool) -> str:
    """The name the plugin looks up (kernelFile in the C++ source)."""
    kind = "decode" if decode else "prefill"
    return f"tree_attention_{dtype}_h{num_heads}_kv{num_kv_heads}_d{head_size}_bs{block_size}_{kind}.ptx"


def write_kernels(out: Path, cc: int, dtype: str, *, num_heads: int, num_kv_heads: int, head_size: int,
                  block_size: int) -> list[Path]:
    """Compile the decode and prefill images for compute capability `cc` into `out`; returns the files."""
    import torch
    import triton

    from apar_rt.kernels.aot import _ATTENTION_ARGS, _PTR, _compile
    from apar_rt.kernels.tree_attention import SUPPORTED_HEAD_DIMS, _tree_attention_kernel, plan_launch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if head_size not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"tree attention kernel: head size {head_size} is not supported; supported: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    tdtype = getattr(torch, dtype)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for decode in (True, False):
        # the tiles plan_launch picks for a decode-like and a prefill-like step, one split
        tokens, seqs = (1, 1) if decode else (64, 1)
        plan = plan_launch(tokens, seqs, num_heads, num_kv_heads, head_size, 1, torch.device("cpu"), num_splits=1)
        sig = {a: _PTR[tdtype] for a in (*_ATTENTION_ARGS[:5], "out_ptr")}
        sig |= {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "query_start_ptr": "*i32",
                "mask_ptr": "*i1", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "scale_log2": "fp32"}
        sig |= {a: "i32" for a in _ATTENTION_ARGS[13:]}
        sig = {a: sig[a] for a in _ATTENTION_ARGS}
        const = dict(NUM_Q_HEADS=num_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_size,
                     BLOCK_D=triton.next_power_of_2(head_size), BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m,
                     BLOCK_N=plan.block_n, BLOCK_SIZE=block_size, NUM_SPLITS=1,
                     DOT_PRECISION="ieee" if tdtype == torch.float32 else "tf32", WIDEN_DOT=False)
        compiled = _compile(_tree_attention_kernel, sig, const, cc, plan.num_warps, plan.num_stages)
        header = (f"// apar-kernel: block_q={plan.block_q} block_m={plan.block_m} num_warps={plan.num_warps} "
                  f"shared={compiled.metadata.shared}\n")
        path = out / file_name(dtype, num_heads, num_kv_heads, head_size, block_size, decode)
        path.write_text(header + compiled.asm["ptx"])
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apar_rt.trt.plugin_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (its config.json gives the head shapes)")
    p.add_argument("--cc", type=int, required=True, help="compute capability as an integer: 80, 86, 87, 89, 90, 120")
    p.add_argument("--dtype", default="float16", choices=DTYPES)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (as apar-rt build)")
    p.add_argument("--out", required=True, help="folder for the .ptx files (the plugin reads <lib dir>/kernels "
                                                "or $APAR_TRT_KERNEL_DIR)")
    a = p.parse_args(argv)
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    for path in write_kernels(Path(a.out), a.cc, a.dtype, num_heads=heads,
                              num_kv_heads=cfg.get("num_key_value_heads", heads),
                              head_size=cfg.get("head_dim") or cfg["hidden_size"] // heads, block_size=a.block_size):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
