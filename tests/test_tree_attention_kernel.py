"""The Triton kernel of `apar::tree_paged_attention` against the torch reference op.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py before triton is
imported): the same kernel source, executed on CPU tensors. Every output is poisoned first, every
step is freshly random, and the pool's unused slots hold large garbage.
"""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from apar_rt.kernels.tree_attention import (  # noqa: E402
    KernelUnsupported, plan_launch, tree_paged_attention)
from apar_rt.ops.tree_attention import tree_paged_attention_reference  # noqa: E402
from test_tree_attention import Seq, build_step, causal, make_seq, random_parents, tree_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||out - ref|| / ||ref|| bounds per dtype (reference in float64 on upcast inputs).
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def run_both(step, dtype, **kernel_kw):
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in step.args()]
    q, k, v, kc, vc, bt, ctx, qs, mask, scale = args
    cast = lambda t: t.to(dtype)  # noqa: E731
    out = torch.full_like(cast(q), float("nan"))                 # poison: every element must be written
    got = tree_paged_attention(cast(q), cast(k), cast(v), cast(kc), cast(vc), bt, ctx, qs, mask, scale,
                               out=out, **kernel_kw)
    assert got.data_ptr() == out.data_ptr()
    ref_in = [cast(t).double() for t in (q, k, v, kc, vc)]
    want = tree_paged_attention_reference(*ref_in, bt, ctx, qs, mask, scale)
    return got, want


def assert_rel_close(got, want, dtype):
    assert not torch.isnan(got).any(), "some output elements were never written"
    err = (got.double() - want).norm() / want.norm()
    assert err < REL_TOL[dtype], f"relative error {err:.2e} over {REL_TOL[dtype]:.0e} for {dtype}"


def mixed_seqs(rng: random.Random, n: int, block_size: int, max_ctx: int = 70):
    kinds = ["prefill", "decode", "tree", "decode"]
    seqs = []
    for _ in range(n):
        kind = rng.choice(kinds)
        ctx = rng.randrange(0, max_ctx)
        if kind == "prefill":
            seqs.append(Seq(kind, ctx, causal(rng.randrange(1, 40))))
        elif kind == "tree":
            seqs.append(Seq(kind, ctx, tree_mask(random_parents(rng, rng.randrange(2, 12)))))
        else:
            seqs.append(make_seq(rng, "decode", ctx))
    return seqs


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 4, 64), (8, 2, 64), (4, 1, 128), (6, 2, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_packed_steps_fp32(block_size, hq, hkv, head_dim, seed):
    rng = random.Random(seed * 7 + block_size)
    seqs = mixed_seqs(rng, rng.randrange(2, 6), block_size)
    step = build_step(seed, seqs, hq=hq, hkv=hkv, block_size=block_size, head_dim=head_dim)
    got, want = run_both(step, torch.float32)
    assert_rel_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [3, 4])
def test_half_precision_steps(dtype, seed):
    rng = random.Random(seed)
    seqs = mixed_seqs(rng, 4, 16)
    step = build_step(seed, seqs, hq=8, hkv=2, block_size=16, head_dim=128)
    got, want = run_both(step, dtype)
    assert got.dtype == dtype
    assert_rel_close(got, want, dtype)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_flash_decoding_splits_agree(num_splits):
    """Long contexts split across programs; every split count computes the same function."""
    rng = random.Random(num_splits)
    seqs = [make_seq(rng, "decode", c) for c in (300, 17, 0, 129)] + [Seq("tree", 200, tree_mask([-1, 0, 0, 1]))]
    step = build_step(num_splits, seqs, hq=4, hkv=2, block_size=16, head_dim=64)
    got, want = run_both(step, torch.float32, num_splits=num_splits)
    assert_rel_close(got, want, torch.float32)


def test_prefill_starting_mid_block_and_context_zero():
    seqs = [Seq("prefill", 21, causal(37)),      # chunk starts at slot 5 of its second block
            Seq("prefill", 0, causal(19)),       # context of 0
            Seq("decode", 0, [[True]]),
            Seq("empty", 5, [])]                 # a sequence with no new tokens this step
    step = build_step(9, seqs, hq=4, hkv=2, block_size=16, head_dim=64, pad_with_live_blocks=True)
    got, want = run_both(step, torch.float32)
    assert_rel_close(got, want, torch.float32)


def test_only_own_new_tokens_are_seen():
    """Two sequences with identical queries but different masks and contexts differ as the oracle says."""
    seqs = [Seq("tree", 3, tree_mask([-1, 0, 1, 0])), Seq("tree", 40, tree_mask([-1, 0, 0, 2]))]
    step = build_step(11, seqs, hq=4, hkv=4, block_size=32, head_dim=64)
    step.q[4:] = step.q[:4]
    got, want = run_both(step, torch.float32)
    assert_rel_close(got, want, torch.float32)
    assert not torch.allclose(got[:4], got[4:])


def test_plan_splits_only_when_few_programs_see_long_contexts():
    cpu = torch.device("cpu")
    assert plan_launch(1, 1, 32, 32, 128, 2048, cpu).num_splits > 1            # batch 1, long context
    assert plan_launch(64, 64, 32, 32, 128, 2048, cpu).num_splits == 1         # batch 64 fills the chip
    assert plan_launch(1, 1, 32, 32, 128, 128, cpu).num_splits == 1            # short context
    p = plan_launch(980 + 32, 33, 32, 8, 128, 2048, cpu)                       # prefill-heavy: big tiles
    assert p.block_m == 64 and p.block_q == 16


@pytest.mark.parametrize("bad,match", [
    (dict(head_dim=40), "head size 40 is not supported; supported: 32, 64"),
    (dict(dtype=torch.float64), "dtype torch.float64 is not supported"),
])
def test_unsupported_inputs_are_named(bad, match):
    step = build_step(0, [Seq("decode", 3, [[True]])], hq=2, hkv=1, block_size=16,
                      head_dim=bad.get("head_dim", 64))
    dtype = bad.get("dtype", torch.float32)
    q, k, v, kc, vc, bt, ctx, qs, mask, scale = step.args()
    with pytest.raises(KernelUnsupported, match=match):
        tree_paged_attention(q.to(dtype), k.to(dtype), v.to(dtype), kc.to(dtype), vc.to(dtype),
                             bt, ctx, qs, mask, scale)


def test_write_kv_scatters_on_the_device_and_skips_negative_slots():
    from apar_rt.kernels.kv_cache import write_kv

    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(6, 2, 64, generator=gen), torch.randn(6, 2, 64, generator=gen)
    kc, vc = torch.randn(4, 16, 2, 64, generator=gen), torch.randn(4, 16, 2, 64, generator=gen)
    want_k, want_v = kc.clone(), vc.clone()
    slots = torch.tensor([17, -1, 5, 63, -1, 32], dtype=torch.int32)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 16, s % 16], want_v[s // 16, s % 16] = k[t], v[t]
    write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    # token_ids: write chosen rows (Medusa's accepted nodes) to chosen slots
    write_kv(k, v, kc, vc, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([4, 0], dtype=torch.int32))
    assert torch.equal(kc[0, 1], k[4]) and torch.equal(vc[0, 2], v[0])


def test_kernels_compile_to_ptx_for_a100_orin_and_hopper():
    """Compiles the real kernels (no interpreter) for sm_80, sm_87 and sm_90 on this CPU machine."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from apar_rt.kernels.aot import compile_rope_and_cache, compile_tree_attention, compile_write_kv\n"
        "from apar_rt.kernels.tree_attention import plan_launch\n"
        "for cc in (80, 87, 90):\n"
        "    for dt, hd, plan in ((torch.float16, 128, None), (torch.bfloat16, 64, plan_launch(64, 64, 8, 2, 64, 512, "
        "torch.device('cpu'), num_splits=1))):\n"
        "        ptx = compile_tree_attention(cc, dt, num_q_heads=8, num_kv_heads=2, head_dim=hd, block_size=16, plan=plan)\n"
        "        assert f'.target sm_{cc}' in ptx['tree_attention'] and 'mma' in ptx['tree_attention'], cc\n"
        "        assert ('combine_splits' in ptx) == (plan is None)\n"
        "    assert '.entry' in compile_write_kv(cc, torch.float16, num_kv_heads=2, head_dim=64, block_size=16)\n"
        "    for dt in (torch.float16, torch.bfloat16, torch.float32):\n"
        "        ptx = compile_rope_and_cache(cc, dt, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)\n"
        "        assert f'.target sm_{cc}' in ptx and '.entry' in ptx, cc\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_gpu_without_triton_names_the_missing_package():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "from apar_rt.ops.tree_attention import gpu_kernels\n"
            "try:\n    gpu_kernels()\nexcept RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs the Triton kernel language" in out.stdout and "pip install triton" in out.stdout, out.stderr
