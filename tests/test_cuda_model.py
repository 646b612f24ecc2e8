"""The fused CUDA layer path (Triton kernels, run by the interpreter here) against the plain model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from apar_rt.backends.cuda_model import fuse_projections, fused_hidden_states  # noqa: E402
from apar_rt.kernels.fused import add_rms_norm, rope_and_cache_, silu_mul  # noqa: E402
from apar_rt.model.llama import apply_rope, half_swap, rope_tables  # noqa: E402


def test_fused_elementwise_kernels_match_torch():
    g = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(5, 96, generator=g), torch.randn(5, 96, generator=g), torch.randn(96, generator=g)
    out, res = add_rms_norm(x, r, w, 1e-5)
    s = x + r
    want = w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(res, s)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    q, k = torch.randn(5, 3, 64, generator=g), torch.randn(5, 3, 64, generator=g)
    pos = torch.tensor([0, 7, 3, 100, 2], dtype=torch.int32)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    tables = rope_tables(pos, inv, q.dtype)
    got_q, got_k = q.clone(), k.clone()
    rope_and_cache_(got_q, got_k, k, pos, inv)
    torch.testing.assert_close(got_q, apply_rope(q, *tables, half_swap(64)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, apply_rope(k, *tables, half_swap(64)), rtol=1e-5, atol=1e-5)
    gu = torch.randn(4, 2 * 1500, generator=g)
    torch.testing.assert_close(silu_mul(gu), torch.nn.functional.silu(gu[:, :1500]) * gu[:, 1500:],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_and_cache_rotates_q_and_k_and_writes_the_pool(dtype):
    """q and k rotated in place (GQA, views into one fused QKV row, as the layer passes them), and
    the rotated k and v written to the pool at each token's slot, as the rotation and
    `write_kv` apart give them; a slot of -1 (a draft-tree node) writes nothing."""
    from apar_rt.kernels.kv_cache import write_kv

    g = torch.Generator().manual_seed(1)
    T, hq, hkv, d, bs, nb = 6, 4, 2, 32, 16, 5
    qkv = torch.randn(T, hq + 2 * hkv, d, generator=g).to(dtype)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    pos = torch.tensor([0, 5, 17, 16, 300, 2], dtype=torch.int32)
    slots = torch.tensor([3, 16, -1, 79, 40, 0], dtype=torch.int32)   # blocks 0, 1, 4, 2, 0; one unwritten
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    tables = rope_tables(pos, inv, torch.float32)
    want_q, want_k = (apply_rope(x.float(), *tables, half_swap(d)).to(dtype) for x in (q, k))
    poison = torch.full((nb, bs, hkv, d), 1e4, dtype=dtype)
    want_kc, want_vc = poison.clone(), poison.clone()
    write_kv(want_k.contiguous(), v.contiguous(), want_kc, want_vc, slots)
    kc, vc = poison.clone(), poison.clone()
    v_before = v.clone()
    rope_and_cache_(q, k, v, pos, inv, kc, vc, slots)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)
    assert torch.equal(v, v_before)
    torch.testing.assert_close(kc, want_kc, **tol)
    assert torch.equal(vc, want_vc)                  # v is copied as it is
    assert torch.equal(kc.view(-1, hkv, d)[slots[slots >= 0].long()], k[slots >= 0])   # the stored k is the rotated k
    written = set(slots[slots >= 0].tolist())
    for s in range(nb * bs):
        if s not in written:
            assert (kc.view(-1, hkv, d)[s] == 1e4).all() and (vc.view(-1, hkv, d)[s] == 1e4).all()


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
        # with slots, each layer also writes its new K/V to its pools (the step reads the same context)
        slots = torch.tensor([53, 54, 55, 56, 57, 58, 27, -1], dtype=torch.int32)   # blocks 3, 1 and a tree node
        kcs2, vcs2 = [c.clone() for c in kcs], [c.clone() for c in vcs]
        h2, _, _ = fused_hidden_states(model, ids, pos, kcs2, vcs2, tables, ctx, qs, mask, slots)
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want_h)       # the plain path still works on packed weights
    torch.testing.assert_close(h2, h)
    for a, b in zip(k + v, want_k + want_v):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    written = slots >= 0
    for pools, before, new in ((kcs2, kcs, want_k), (vcs2, vcs, want_v)):
        for c, c0, x in zip(pools, before, new):
            flat, flat0 = c.view(-1, *c.shape[2:]), c0.view(-1, *c0.shape[2:])
            torch.testing.assert_close(flat[slots[written].long()], x[written], rtol=1e-4, atol=1e-4)
            others = torch.ones(flat.shape[0], dtype=torch.bool)
            others[slots[written].long()] = False
            assert torch.equal(flat[others], flat0[others])
