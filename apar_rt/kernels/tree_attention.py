"""The GPU kernel of `apar::tree_paged_attention`, written once in Triton.

It computes exactly the contract in `apar_rt.ops.tree_attention.tree_paged_attention_reference`.
The torch backend on CUDA reaches it through the op's CUDA registration, and the TensorRT
plugin launches the same `launch_tree_attention`; `TRITON_INTERPRET=1` runs it on CPU tensors
in CI.

Work decomposition (cost follows each sequence's own query length and context):
- Grid axis 0 walks *query tiles*: sequence b owns tiles `query_start[b] // BLOCK_Q + b` onwards,
  one per BLOCK_Q of its new tokens. `T // BLOCK_Q + B` tiles bound the total on the host without
  reading device memory; a program finds its sequence by binary search and leaves at once when
  its tile lies past its sequence's tokens. No sequence is padded to the step's longest query.
- A tile's rows are (new token, query head of one KV group) pairs, so a decode token of a GQA
  model fills the matrix unit with its group's heads, and each K/V tile is read once per group.
- Grid axis 1 is the KV head; axis 2 splits each sequence's cached context into NUM_SPLITS
  contiguous ranges (flash-decoding). The last split also covers the sequence's new tokens under
  the visibility mask. With more than one split, per-split (max, sum, acc) go to a scratch buffer
  and a small reduce kernel combines them.

Softmax runs in float32 (exp2 with the scale folded in); fp16/bf16 operands use the matrix unit
with float32 accumulation; float32 operands use IEEE dot products.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


class KernelUnsupported(ValueError):
    """The inputs fall outside what the kernel supports; the message says what is."""


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first tile `query_start[b] // BLOCK_Q + b` is <= tile."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _p_dot_v(p, v_t, DOT_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr):
    """Probabilities (rounded to the operand dtype, as the matrix unit takes them) times values."""
    p = p.to(v_t.dtype)
    if WIDEN_DOT:
        return tl.dot(p.to(tl.float32), v_t.to(tl.float32), input_precision="ieee")
    return tl.dot(p, v_t, input_precision=DOT_PRECISION)


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_start_ptr,
    mask_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2, num_seqs, max_q,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_bt, stride_mt, stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    b = _find_sequence(query_start_ptr, num_seqs, tile, BLOCK_Q)
    q_begin = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_begin
    local_tile = tile - (q_begin // BLOCK_Q + b)
    if local_tile * BLOCK_Q < q_len:
        context_len = tl.load(context_lens_ptr + b)

        rows = tl.arange(0, BLOCK_M)
        q_idx = local_tile * BLOCK_Q + rows // GROUP            # index among the sequence's new tokens
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
        token = q_begin + q_idx
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if WIDEN_DOT:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # This split's share of the cached context: every new token sees all of it.
        per_split = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(context_len, lo + per_split)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_ok = pos < hi
            block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=pos_ok, other=0)
            base = block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            k_t = tl.load(k_cache_ptr + base[None, :] + d[:, None], mask=pos_ok[None, :] & d_ok[:, None], other=0.0)
            if WIDEN_DOT:
                k_t = k_t.to(tl.float32)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(pos_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            v_t = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _p_dot_v(p, v_t, DOT_PRECISION, WIDEN_DOT)
            m_i = m_new

        # The sequence's own new tokens, under the visibility mask: the last split only.
        if split == NUM_SPLITS - 1:
            for start in range(0, q_len, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N)
                j_ok = (j < q_len) & (j < max_q)
                k_t = tl.load(k_ptr + (q_begin + j)[None, :] * stride_kt + kv_head * stride_kh + d[:, None],
                              mask=j_ok[None, :] & d_ok[:, None], other=0.0)
                if WIDEN_DOT:
                    k_t = k_t.to(tl.float32)
                visible = tl.load(mask_ptr + token[:, None] * stride_mt + j[None, :],
                                  mask=row_ok[:, None] & j_ok[None, :], other=0)
                s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2
                s = tl.where(visible != 0, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_use[:, None])
                alpha = tl.exp2(m_i - m_use)
                v_t = tl.load(v_ptr + (q_begin + j)[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                              mask=j_ok[:, None] & d_ok[None, :], other=0.0)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _p_dot_v(p, v_t, DOT_PRECISION, WIDEN_DOT)
                m_i = m_new

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            slot = (token.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + split      # [BLOCK_M]
            tl.store(part_acc_ptr + slot[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + slot * 2, m_i, mask=row_ok)
            tl.store(part_ml_ptr + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < NUM_SPLITS
    slot = (token.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + slot * 2, mask=s_ok, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + slot * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)                          # finite: the last split holds the token itself
    w = tl.exp2(m - m_max)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + slot[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l_part, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and the split count of one launch; a function of host-known shapes only, so a
    captured CUDA graph replays the same plan."""

    block_q: int
    block_m: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132   # interpreter runs: plan as for an H100/H200 so the split path is exercised


def plan_launch(num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                max_context: int, device: torch.device, *, num_splits: int | None = None,
                block_n: int | None = None, num_warps: int | None = None) -> LaunchPlan:
    """Pick tiles from shapes the host knows (never from device data).

    Decode-like steps (about one token per sequence) use the smallest tile the matrix unit takes,
    filled with the KV group's query heads; prefill chunks and draft trees use 64-row tiles.
    Few programs over long contexts split the context (flash-decoding) to fill the chip.
    """
    group = num_q_heads // num_kv_heads
    if num_tokens <= 2 * max(num_seqs, 1):
        block_m = max(16, triton.next_power_of_2(group))
    else:
        block_m = max(64, triton.next_power_of_2(group))
    block_q = max(1, block_m // group)
    if block_n is None:   # measured on an H200 (B=64, ctx 2048, d128): 128 beat 64 and 32 for decode
        block_n = (128 if block_m <= 32 else 64) if head_dim <= 128 else 32
    tiles = num_tokens // block_q + num_seqs
    if num_splits is None:
        programs = max(1, tiles * num_kv_heads)
        want = math.ceil(2 * _sm_count(device) / programs)
        num_splits = max(1, min(16, want, math.ceil(max_context / 256)))
    return LaunchPlan(block_q=block_q, block_m=block_m, block_n=block_n, num_splits=num_splits,
                      num_warps=num_warps or 4, num_stages=2)


def check_supported(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Raise KernelUnsupported naming the bad value and what is supported."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise KernelUnsupported(f"tree_paged_attention kernel: dtype {q.dtype} is not supported; "
                                f"supported: float16, bfloat16, float32")
    if k.dtype != q.dtype or k_cache.dtype != q.dtype:
        raise KernelUnsupported(f"tree_paged_attention kernel: q, k/v and the KV pool must share one dtype "
                                f"(got q {q.dtype}, k {k.dtype}, pool {k_cache.dtype})")
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise KernelUnsupported(f"tree_paged_attention kernel: head size {head_dim} is not supported; "
                                f"supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if q.shape[1] % k.shape[1]:
        raise KernelUnsupported(f"tree_paged_attention kernel: {q.shape[1]} query heads are not a multiple "
                                f"of {k.shape[1]} KV heads")


def launch_tree_attention(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, out,
                          *, scale: float, num_tokens: int, num_seqs: int, num_q_heads: int,
                          num_kv_heads: int, head_dim: int, block_size: int, max_q: int,
                          strides: dict, plan: LaunchPlan, scratch: tuple | None = None) -> None:
    """Launch on raw buffers: anything with `.data_ptr()` and `.dtype` (torch tensors, or the
    TensorRT plugin's wrapped device pointers). `strides` holds the element strides named in
    `tensor_strides`. `scratch` = (part_acc fp32 [T*Hq*splits*BLOCK_D], part_ml fp32
    [T*Hq*splits*2]) is needed when plan.num_splits > 1.
    """
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    group = num_q_heads // num_kv_heads
    # Triton's interpreter (3.9) computes bf16 x bf16 dots wrongly; there the operands are widened
    # to fp32 first, which is exact (a bf16 product fits fp32) and keeps fp32 accumulation.
    widen = q.dtype == torch.bfloat16 and INTERPRETING
    precision = "ieee" if q.dtype == torch.float32 or widen else "tf32"
    part_acc, part_ml = scratch if plan.num_splits > 1 else (out, out)
    grid = (num_tokens // plan.block_q + num_seqs, num_kv_heads, plan.num_splits)
    st = strides
    _tree_attention_kernel[grid](
        q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, out, part_acc, part_ml,
        scale * LOG2E, num_seqs, max_q,
        st["qt"], st["qh"], st["kt"], st["kh"], st["vt"], st["vh"],
        st["cb"], st["cs"], st["ch"], st["bt"], st["mt"], st["ot"], st["oh"],
        NUM_Q_HEADS=num_q_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_SIZE=block_size,
        NUM_SPLITS=plan.num_splits, DOT_PRECISION=precision, WIDEN_DOT=widen,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    if plan.num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            part_acc, part_ml, out, st["ot"], st["oh"],
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            NUM_SPLITS=plan.num_splits, SPLITS_P2=triton.next_power_of_2(plan.num_splits), num_warps=4)


def tensor_strides(q, k, v, k_cache, v_cache, block_tables, mask, out) -> dict:
    """Element strides the kernel needs; the innermost (head_dim) stride must be 1 everywhere."""
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise KernelUnsupported(f"tree_paged_attention kernel: {name} must be contiguous in head_dim")
    if k_cache.stride() != v_cache.stride():
        raise KernelUnsupported("tree_paged_attention kernel: the K and V pools must share one layout")
    if block_tables.stride(-1) != 1 or mask.stride(-1) != 1:
        raise KernelUnsupported("tree_paged_attention kernel: block_tables and mask rows must be contiguous")
    return {"qt": q.stride(0), "qh": q.stride(1), "kt": k.stride(0), "kh": k.stride(1),
            "vt": v.stride(0), "vh": v.stride(1), "cb": k_cache.stride(0), "cs": k_cache.stride(1),
            "ch": k_cache.stride(2), "bt": block_tables.stride(0), "mt": mask.stride(0),
            "ot": out.stride(0), "oh": out.stride(1)}


def tree_paged_attention(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask,
                         scale: float, *, out: torch.Tensor | None = None, max_context: int | None = None,
                         num_splits: int | None = None, block_n: int | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """The op contract on torch tensors (see the reference's docstring); returns [T, Hq, D].

    max_context: an upper bound on context_lens known on the host (default: the block tables'
    width times the block size), used only to choose the split count.
    """
    check_supported(q, k, k_cache)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    B, max_blocks = block_tables.shape
    block_size = k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32 or query_start.dtype != torch.int32:
        raise KernelUnsupported("tree_paged_attention kernel: block_tables, context_lens and query_start "
                                "must be int32")
    if max_context is None:
        max_context = max_blocks * block_size
    plan = plan_launch(T, B, Hq, Hkv, D, max_context, q.device, num_splits=num_splits, block_n=block_n,
                       num_warps=num_warps)
    scratch = None
    if plan.num_splits > 1:
        rows = T * Hq * plan.num_splits
        scratch = (torch.empty(rows * triton.next_power_of_2(D), dtype=torch.float32, device=q.device),
                   torch.empty(rows * 2, dtype=torch.float32, device=q.device))
    launch_tree_attention(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, out,
                          scale=scale, num_tokens=T, num_seqs=B, num_q_heads=Hq, num_kv_heads=Hkv,
                          head_dim=D, block_size=block_size, max_q=mask.shape[1],
                          strides=tensor_strides(q, k, v, k_cache, v_cache, block_tables, mask, out),
                          plan=plan, scratch=scratch)
    return out
