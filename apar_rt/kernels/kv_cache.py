"""Writing a step's new K/V into the paged pool on the device (Triton), with no trip through the host."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def slot_offset(slot, stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr):
    """Element offset of flat slot `slot` (block * BLOCK_SIZE + position) in a pool
    [num_blocks, block_size, ...] with strides stride_cb, stride_cs (int64: pools pass 2^31)."""
    return (slot // BLOCK_SIZE).to(tl.int64) * stride_cb + (slot % BLOCK_SIZE) * stride_cs


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, token_ids_ptr,
                     stride_kt, stride_vt, stride_cb, stride_cs,
                     ROW: tl.constexpr, BLOCK_ROW: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     HAS_TOKEN_IDS: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slots_ptr + i)
    if slot >= 0:
        token = tl.load(token_ids_ptr + i) if HAS_TOKEN_IDS else i
        x = tl.arange(0, BLOCK_ROW)
        ok = x < ROW
        dst = slot_offset(slot, stride_cb, stride_cs, BLOCK_SIZE) + x
        tl.store(k_cache_ptr + dst, tl.load(k_ptr + token * stride_kt + x, mask=ok), mask=ok)
        tl.store(v_cache_ptr + dst, tl.load(v_ptr + token * stride_vt + x, mask=ok), mask=ok)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
    """k_cache[slot] = k[token] for each (token, slot); slots < 0 are skipped.

    k, v: [T, Hkv, D], contiguous per token; pools [num_blocks, block_size, Hkv, D] contiguous.
    slots: [N] int32/int64 flat slots (block * block_size + offset). token_ids: [N] rows of k/v
    to write (default: row i for slot i, N == T).
    """
    n = slots.shape[0]
    if n == 0:
        return
    row = k.shape[1] * k.shape[2]
    assert k.stride(1) == k.shape[2] and k.stride(2) == 1 and v.stride(1) == v.shape[2] and v.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _write_kv_kernel[(n,)](k, v, k_cache, v_cache, slots, token_ids if token_ids is not None else slots,
                           k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1),
                           ROW=row, BLOCK_ROW=triton.next_power_of_2(row), BLOCK_SIZE=k_cache.shape[1],
                           HAS_TOKEN_IDS=token_ids is not None, num_warps=4)
