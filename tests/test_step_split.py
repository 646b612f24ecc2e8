"""Splitting a mixed step into decode and prefill runs (what the tensorrt backend does) changes nothing.

Oracle: the same engine run on the whole step. The runs go through the onnxruntime backend here
(a TensorRT plan cannot run on this machine); the split itself is backend-independent numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apar_rt.backends.step_split import split_step
from apar_rt.core import StepInput


@pytest.fixture(scope="module")
def ort_engine(tiny_gqa, tmp_path_factory):
    from apar_rt.build.builder import BuildOptions, build

    path, _, _ = tiny_gqa
    out = tmp_path_factory.mktemp("split") / "ort"
    build(BuildOptions(model=str(path), output=str(out), block_size=4, max_batch_size=4, max_seq_len=64),
          progress=False, log=lambda m: None)
    return out


def mixed_step(vocab: int) -> StepInput:
    """decode (ctx 5), prefill 5 (ctx 0), decode (ctx 9), prefill 3 (ctx 4); block size 4."""
    rng = np.random.default_rng(0)
    seqs = [(5, 1), (0, 5), (9, 1), (4, 3)]
    tables, nxt, pos, slots, qs = [], 1, [], [], [0]
    for c, q in seqs:
        n = -(-(c + q) // 4)
        tables.append(list(range(nxt, nxt + n)) + [0] * (4 - n))
        nxt += n
        pos += list(range(c, c + q))
        slots += [tables[-1][p // 4] * 4 + p % 4 for p in range(c, c + q)]
        qs.append(qs[-1] + q)
    T, max_q = qs[-1], max(q for _, q in seqs)
    mask = np.zeros((T, max_q), bool)
    for b, (_, q) in enumerate(seqs):
        mask[qs[b]:qs[b + 1], :q] = np.tril(np.ones((q, q), bool))
    return StepInput(input_ids=rng.integers(0, vocab, T).astype(np.int32), positions=np.array(pos, np.int32),
                     block_tables=np.array(tables, np.int32), context_lens=np.array([c for c, _ in seqs], np.int32),
                     query_start=np.array(qs, np.int32), mask=mask, slot_mapping=np.array(slots, np.int32),
                     logits_indices=np.array([0, 5, 6, 9, 4], np.int32))   # last tokens, out of order, plus one


def test_split_runs_are_the_whole_step(ort_engine):
    from apar_rt.backends.onnxruntime_backend import OnnxRuntimeBackend

    whole, parts = (OnnxRuntimeBackend(str(ort_engine)) for _ in range(2))
    for be in (whole, parts):
        be.allocate_kv(32, 4)
    g = torch.Generator().manual_seed(1)
    for i in range(whole.num_layers):          # the same random cached context in both pools
        for a, b in ((whole.k_caches[i], parts.k_caches[i]), (whole.v_caches[i], parts.v_caches[i])):
            a[...] = torch.randn(a.shape, generator=g).numpy()   # CPU pools are numpy (no torch on that path)
            b[...] = a
    step = mixed_step(whole.vocab_size)
    subs = split_step(step, max_decode_q=1, max_prefill_batch=1)
    assert [(s.kind, s.step.block_tables.shape[0], s.step.num_tokens) for s in subs] == \
        [("decode", 2, 2), ("prefill", 1, 5), ("prefill", 1, 3)]
    assert sorted(np.concatenate([s.tokens for s in subs]).tolist()) == list(range(step.num_tokens))
    assert sorted(np.concatenate([s.logits_rows for s in subs]).tolist()) == list(range(5))
    want = whole.forward(step).copy()
    got = np.empty_like(want)
    for s in subs:
        got[np.asarray(s.logits_rows)] = parts.forward(s.step)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for i in range(whole.num_layers):
        np.testing.assert_allclose(parts.k_caches[i], whole.k_caches[i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(parts.v_caches[i], whole.v_caches[i], rtol=0, atol=1e-5)


def test_a_decode_only_step_is_one_run():
    step = mixed_step(100)
    only_decode = split_step(step, max_decode_q=5, max_prefill_batch=1)
    assert len(only_decode) == 1 and only_decode[0].step is step and only_decode[0].kind == "decode"


def test_backend_device_always_has_an_index():
    """torch.cuda.set_device(torch.device("cuda")) raises; "cuda" resolves to the current index,
    checked against the (stand-in) machine's GPUs; the tensorrt backend refuses the CPU."""
    from types import SimpleNamespace

    from apar_rt.backends import BackendUnavailable
    from apar_rt.backends.device import resolve_device

    def machine(count, current):
        return SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count,
                               current_device=lambda: current)

    trt = {"runner": "the tensorrt backend", "cuda_only": True}
    assert resolve_device("cuda:1", cuda=machine(2, 0), **trt) == torch.device("cuda", 1)
    assert resolve_device("cuda", cuda=machine(4, 3), **trt) == torch.device("cuda", 3)
    assert resolve_device(None, cuda=machine(4, 2), **trt) == torch.device("cuda", 2)
    assert resolve_device(None, cuda=machine(0, 0)) == torch.device("cpu")
    assert resolve_device(None, cuda=machine(1, 0)) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="the tensorrt backend runs on cuda or cuda:N, not 'cpu'"):
        resolve_device("cpu", cuda=machine(1, 0), **trt)
    with pytest.raises(BackendUnavailable, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2", cuda=machine(2, 0), **trt)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is visible"):
        resolve_device(None, cuda=machine(0, 0), **trt)
