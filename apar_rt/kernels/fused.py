"""Small fused Triton kernels for the CUDA decode path: residual add + RMSNorm, RoPE of q and k in
place with the new K/V written to the pool, and SiLU(gate) * up. Each replaces several
elementwise launches, which dominate a CUDA graph of a 7B decode step at batch 1 once the
matmuls run at memory speed.

Numerics follow the torch model (apar_rt/model/llama.py): the norm runs in float32 and rounds to
the activation dtype before the weight; RoPE is HF's rotate-half convention with the angles
computed in float32 from the positions and inverse frequencies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from apar_rt.kernels.kv_cache import slot_offset


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, eps,
                         N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < N
    x = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + c, mask=ok, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_o + c, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rmsnorm(x + residual) * weight, x + residual); with residual None, (rmsnorm(x) * weight, x).

    x, residual: [T, N] with unit inner stride. Returns new tensors; the inputs are not modified.
    """
    T, N = x.shape
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    if T:
        _add_rms_norm_kernel[(T,)](x, residual if residual is not None else x, weight, out, res_out,
                                   x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                                   eps, N=N, BLOCK=triton.next_power_of_2(N), HAS_RES=residual is not None,
                                   num_warps=8 if N >= 4096 else 4)
    return out, res_out


@triton.jit
def _rotate(base, cos, sin, stride_h, H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_HALF: tl.constexpr):
    """Rotate heads [0, H) at `base` (head stride stride_h) in place; returns the two rotated
    halves, rounded to the tensor's dtype, as stored."""
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    ok = (h[:, None] < H) & (i[None, :] < HALF)
    at = base + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF, mask=ok, other=0.0).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(base.dtype.element_ty)
    r2 = (x2 * cos + x1 * sin).to(base.dtype.element_ty)
    tl.store(at, r1, mask=ok)
    tl.store(at + HALF, r2, mask=ok)
    return r1, r2


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs,
                       HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                       BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       WRITE: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    ang = pos * tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    cos = tl.cos(ang)[None, :]
    sin = tl.sin(ang)[None, :]
    _rotate(q_ptr + t * stride_qt, cos, sin, stride_qh, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
    k1, k2 = _rotate(k_ptr + t * stride_kt, cos, sin, stride_kh, HKV, HALF, BLOCK_HKV, BLOCK_HALF)
    if WRITE:
        slot = tl.load(slots_ptr + t)
        if slot >= 0:   # a draft-tree node's K/V waits for acceptance (slot -1)
            h = tl.arange(0, BLOCK_HKV)
            ok = (h[:, None] < HKV) & (i[None, :] < HALF)
            # pools [num_blocks, block_size, Hkv, D]: head h of a slot at h * D
            dst = slot_offset(slot, stride_cb, stride_cs, BLOCK_SIZE) + h[:, None] * (2 * HALF) + i[None, :]
            tl.store(k_cache_ptr + dst, k1, mask=ok)
            tl.store(k_cache_ptr + dst + HALF, k2, mask=ok)
            v = v_ptr + t * stride_vt + h[:, None] * stride_vh + i[None, :]
            tl.store(v_cache_ptr + dst, tl.load(v, mask=ok), mask=ok)
            tl.store(v_cache_ptr + dst + HALF, tl.load(v + HALF, mask=ok), mask=ok)


def rope_and_cache_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, k_cache: torch.Tensor | None = None,
                    v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> None:
    """RoPE on q [T, Hq, D] and k [T, Hkv, D] in place, in one launch; with pools, the rotated k
    and v [T, Hkv, D] also go to k_cache / v_cache at `slots` ([T] flat slots, block * block_size
    + offset; a slot < 0 is not written), as `kv_cache.write_kv` writes them.

    q, k and v may be views into a fused QKV output (unit inner stride). Pools are
    [num_blocks, block_size, Hkv, D], contiguous. The pools must not hold a slot that the step
    reads as context: the block pool's copy-on-write makes every new token's block its own.
    """
    T, HQ, D = q.shape
    HKV = k.shape[1]
    if not T:
        return
    write = slots is not None
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    if write:
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (HKV, D)
    _rope_cache_kernel[(T,)](q, k, v, positions, inv_freq, k_cache if write else k, v_cache if write else v,
                             slots if write else positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             v.stride(0), v.stride(1), k_cache.stride(0) if write else 0,
                             k_cache.stride(1) if write else 0, HQ=HQ, HKV=HKV, HALF=D // 2,
                             BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HKV=triton.next_power_of_2(HKV),
                             BLOCK_HALF=triton.next_power_of_2(D // 2),
                             BLOCK_SIZE=k_cache.shape[1] if write else 1, WRITE=write, num_warps=4)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < N
    g = tl.load(gu_ptr + row * stride_g + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + N + c, mask=ok, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (silu * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] of shape [T, 2N]; returns [T, N]."""
    T, N2 = gate_up.shape
    N = N2 // 2
    out = torch.empty(T, N, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        BLOCK = 1024
        _silu_mul_kernel[(T, triton.cdiv(N, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), N=N,
                                                     BLOCK=BLOCK, num_warps=4)
    return out
