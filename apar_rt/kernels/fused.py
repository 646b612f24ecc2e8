"""Small fused Triton kernels for the CUDA decode path: residual add + RMSNorm, RoPE in place,
and SiLU(gate) * up. Each replaces several elementwise launches, which dominate a CUDA graph of a
7B decode step at batch 1 once the matmuls run at memory speed.

Numerics follow the torch model (apar_rt/model/llama.py): the norm runs in float32 and rounds to
the activation dtype before the weight; RoPE is HF's rotate-half convention with the angles
computed in float32 from the positions and inverse frequencies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _rope_kernel(x_ptr, pos_ptr, inv_freq_ptr, stride_t, stride_h, H: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    ok = (h[:, None] < H) & (i[None, :] < HALF)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    ang = pos * tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    cos = tl.cos(ang)[None, :]
    sin = tl.sin(ang)[None, :]
    base = x_ptr + t * stride_t + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(base, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(base + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=ok)


def rope_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] (unit inner stride; may be a view into a fused QKV output) in place."""
    T, H, D = x.shape
    if T:
        _rope_kernel[(T,)](x, positions, inv_freq, x.stride(0), x.stride(1), H=H, HALF=D // 2,
                           BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(D // 2),
                           num_warps=4)
    return x


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
