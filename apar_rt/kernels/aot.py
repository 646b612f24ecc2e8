"""Ahead-of-time compilation of the Triton kernels to PTX for a given GPU, without a GPU.

Used by CI to prove the kernels compile for sm_80 (A100), sm_87 (Jetson Orin) and sm_90
(H100/H200), and by anything that must ship a kernel image (e.g. a TensorRT plan) instead of
compiling at run time. Must run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import os

import torch

from apar_rt.kernels.tree_attention import (
    LaunchPlan, _combine_splits_kernel, _tree_attention_kernel, plan_launch)
from apar_rt.kernels.fused import _rope_cache_kernel
from apar_rt.kernels.kv_cache import _write_kv_kernel

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_ATTENTION_ARGS = ["q_ptr", "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "context_lens_ptr",
                   "query_start_ptr", "mask_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr", "scale_log2",
                   "num_seqs", "max_q", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                   "stride_vh", "stride_cb", "stride_cs", "stride_ch", "stride_bt", "stride_mt", "stride_ot",
                   "stride_oh"]


def _compile(fn, signature: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset")
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_tree_attention(cc: int, dtype: torch.dtype, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           block_size: int, plan: LaunchPlan | None = None) -> dict[str, str]:
    """PTX of the attention kernel (and its split combiner when the plan splits) for compute
    capability `cc` (80, 87, 90, ...). Returns {kernel name: PTX text}."""
    import triton

    if plan is None:
        plan = plan_launch(1, 1, num_q_heads, num_kv_heads, head_dim, 4096, torch.device("cpu"))
    ptr = _PTR[dtype]
    sig = {a: ptr for a in _ATTENTION_ARGS[:5]} | {"out_ptr": ptr}
    sig |= {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "query_start_ptr": "*i32", "mask_ptr": "*i1",
            "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "scale_log2": "fp32"}
    sig |= {a: "i32" for a in _ATTENTION_ARGS[13:]}
    sig = {a: sig[a] for a in _ATTENTION_ARGS}
    widen = False
    precision = "ieee" if dtype == torch.float32 else "tf32"
    block_d = triton.next_power_of_2(head_dim)
    const = dict(NUM_Q_HEADS=num_q_heads, GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
                 BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_SIZE=block_size,
                 NUM_SPLITS=plan.num_splits, DOT_PRECISION=precision, WIDEN_DOT=widen)
    out = {"tree_attention": _compile(_tree_attention_kernel, sig, const, cc, plan.num_warps,
                                      plan.num_stages).asm["ptx"]}
    if plan.num_splits > 1:
        csig = {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": ptr, "stride_ot": "i32",
                "stride_oh": "i32"}
        cconst = dict(NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=plan.num_splits,
                      SPLITS_P2=triton.next_power_of_2(plan.num_splits))
        out["combine_splits"] = _compile(_combine_splits_kernel, csig, cconst, cc, 4, 2).asm["ptx"]
    return out


def compile_write_kv(cc: int, dtype: torch.dtype, *, num_kv_heads: int, head_dim: int, block_size: int) -> str:
    """PTX of the K/V scatter kernel for compute capability `cc`."""
    import triton

    ptr = _PTR[dtype]
    sig = {"k_ptr": ptr, "v_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "slots_ptr": "*i32",
           "token_ids_ptr": "*i32", "stride_kt": "i32", "stride_vt": "i32", "stride_cb": "i64", "stride_cs": "i32"}
    row = num_kv_heads * head_dim
    const = dict(ROW=row, BLOCK_ROW=triton.next_power_of_2(row), BLOCK_SIZE=block_size, HAS_TOKEN_IDS=False)
    return _compile(_write_kv_kernel, sig, const, cc, 4, 2).asm["ptx"]


def compile_rope_and_cache(cc: int, dtype: torch.dtype, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           block_size: int) -> str:
    """PTX of the RoPE + K/V write kernel (`fused.rope_and_cache_`) for compute capability `cc`."""
    import triton

    ptr = _PTR[dtype]
    sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "pos_ptr": "*i32", "inv_freq_ptr": "*fp32",
           "k_cache_ptr": ptr, "v_cache_ptr": ptr, "slots_ptr": "*i32"}
    sig |= {a: "i32" for a in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")}
    sig |= {"stride_cb": "i64", "stride_cs": "i32"}
    const = dict(HQ=num_q_heads, HKV=num_kv_heads, HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
                 BLOCK_HKV=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
                 BLOCK_SIZE=block_size, WRITE=True)
    return _compile(_rope_cache_kernel, sig, const, cc, 4, 2).asm["ptx"]
