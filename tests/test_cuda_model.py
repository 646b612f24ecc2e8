"""The fused CUDA layer path (Triton kernels, run by the interpreter here) against the plain model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from apar_rt.backends.cuda_model import fuse_projections, fused_hidden_states  # noqa: E402
from apar_rt.kernels.fused import add_rms_norm, rope_, silu_mul  # noqa: E402
from apar_rt.model.llama import apply_rope, half_swap, rope_tables  # noqa: E402


def test_fused_elementwise_kernels_match_torch():
    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(5, 96, generator=g), torch.randn(5, 96, generator=g), torch.randn(96, generator=g)
    out, res = add_rms_norm(x, r, w, 1e-5)
    s = x + r
    want = w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(res, s)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    q = torch.randn(5, 3, 64, generator=g)
    pos = torch.tensor([0, 7, 3, 100, 2], dtype=torch.int32)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    want = apply_rope(q, *rope_tables(pos, inv, q.dtype), half_swap(64))
    torch.testing.assert_close(rope_(q.clone(), pos, inv), want, rtol=1e-5, atol=1e-5)
    gu = torch.randn(4, 2 * 1500, generator=g)
    torch.testing.assert_close(silu_mul(gu), torch.nn.functional.silu(gu[:, :1500]) * gu[:, 1500:],
                               rtol=1e-5, atol=1e-5)


def test_fused_step_matches_the_plain_model(tmp_path):
    from apar_rt.model.weights import load_model
    from apar_rt.testing.tiny_model import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, hidden=128, num_heads=4, num_kv_heads=2, weight_std=0.1)  # head size 32
    model, cfg = load_model(tmp_path)
    model.eval()
    bs, nb = 16, 12
    pool = lambda: [torch.randn(nb, bs, cfg.num_key_value_heads, cfg.head_dim) for _ in range(cfg.num_hidden_layers)]  # noqa: E731
    kcs, vcs = pool(), pool()
    # one prefill chunk starting mid-block (context 5) and two decodes
    tables = torch.tensor([[3, 7, 0], [1, 0, 0], [9, 4, 2]], dtype=torch.int32)
    ctx = torch.tensor([5, 11, 20], dtype=torch.int32)
    qs = torch.tensor([0, 6, 7, 8], dtype=torch.int32)
    mask = torch.zeros(8, 6, dtype=torch.bool)
    mask[:6, :6] = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    mask[6:, 0] = True
    ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, 8), dtype=torch.int64)
    pos = torch.tensor([5, 6, 7, 8, 9, 10, 11, 20], dtype=torch.int32)
    with torch.no_grad():
        want_h, want_k, want_v = model.hidden_states(ids, pos, kcs, vcs, tables, ctx, qs, mask)
        fuse_projections(model)
        fuse_projections(model)                     # idempotent
        h, k, v = fused_hidden_states(model, ids, pos, kcs, vcs, tables, ctx, qs, mask)
        again, _, _ = model.hidden_states(ids, pos, kcs, vcs, tables, ctx, qs, mask)
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want_h)       # the plain path still works on packed weights
    for a, b in zip(k + v, want_k + want_v):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
