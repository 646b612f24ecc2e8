"""ONNX export: the graph's structure (one apar.TreePagedAttention per layer, a standard-op local
function, full checker) and its numbers against the torch model in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from apar_rt.export import op as aop
from apar_rt.export import step_io
from apar_rt.export.onnx_export import export_onnx


@pytest.fixture(scope="module")
def exported(tiny_gqa, tmp_path_factory):
    path, _, _ = tiny_gqa
    out = tmp_path_factory.mktemp("onnx_gqa") / "model.onnx"
    res = export_onnx(path, out, block_size=4)
    return path, res


@pytest.fixture(scope="module")
def session(exported):
    import onnxruntime as ort

    _, res = exported
    return ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_model(exported):
    from apar_rt.model.weights import load_model

    path, _ = exported
    model, cfg = load_model(path, dtype=torch.float32)
    return model, cfg


def test_full_checker_passes(exported):
    _, res = exported
    onnx.checker.check_model(str(res.path), full_check=True)


def test_one_attention_node_per_layer_with_plugin_attributes(exported, torch_model):
    _, res = exported
    _, cfg = torch_model
    m = onnx.load(str(res.path))
    nodes = [n for n in m.graph.node if n.op_type == aop.OP_TYPE]
    assert len(nodes) == cfg.num_hidden_layers
    assert {(o.domain, o.version) for o in m.opset_import} >= {("apar", 1), ("", 18)}
    for n in nodes:
        assert n.domain == "apar"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"plugin_namespace": b"apar", "plugin_version": b"1",
                         "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
                         "head_size": cfg.head_dim, "block_size": 4,
                         "scale": pytest.approx(cfg.head_dim ** -0.5)}
        assert list(n.input)[3].startswith("k_cache_") and list(n.input)[4].startswith("v_cache_")
    # no other custom-domain node anywhere in the main graph
    assert {n.domain for n in m.graph.node} <= {"", "apar"}


def test_local_function_uses_standard_ops_only(exported):
    _, res = exported
    m = onnx.load(str(res.path))
    assert len(m.functions) == 1
    f = m.functions[0]
    assert (f.domain, f.name) == ("apar", "TreePagedAttention")
    assert list(f.input) == list(aop.OP_INPUTS) and list(f.output) == ["out"]
    assert set(f.attribute) == {name for name, _ in aop.OP_ATTRIBUTES}
    nodes = aop.all_nodes(f)   # If branches included
    assert {n.domain for n in nodes} == {""}, "the function must use default-domain ops only"
    assert {o.domain for o in f.opset_import} == {""}
    types = {n.op_type for n in nodes}
    for t in types:
        assert onnx.defs.has(t, ""), t
    assert {"Softmax", "MatMul", "Gather", "Where"} <= types


def _pool(cfg, num_blocks, block_size, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    pools = [torch.randn(shape, generator=g) for _ in range(2 * cfg.num_hidden_layers)]
    for p in pools:   # the null block's contents must never be seen: huge (finite, per the contract)
        p[0] = 1e4 * torch.randn(p[0].shape, generator=g)
    return pools


def _step(kind: str, cfg):
    """(ids, positions, tables, ctx, query_start, mask, logits_indices) for a step kind (block size 4)."""
    i32 = torch.int32
    if kind == "prefill":      # two prompts, no context
        lens, ctx, tables = [6, 3], [0, 0], [[1, 2], [3, 0]]
    elif kind == "decode":     # three sequences, one token each, over cached context
        lens, ctx, tables = [1, 1, 1], [7, 2, 4], [[1, 2, 0], [3, 0, 0], [4, 5, 0]]
    else:                      # mixed: a prefill chunk after context, a decode, a draft tree
        lens, ctx, tables = [5, 1, 3], [6, 9, 3], [[1, 2, 3], [4, 5, 6], [7, 0, 0]]
    T, max_q = sum(lens), max(lens)
    mask = torch.zeros(T, max_q, dtype=torch.bool)
    pos, qs, t = [], [0], 0
    for b, (n, c) in enumerate(zip(lens, ctx)):
        if kind == "mixed" and b == 2:    # root, child of root, child of root
            mask[t, 0] = True
            mask[t + 1, 0] = mask[t + 1, 1] = True
            mask[t + 2, 0] = mask[t + 2, 2] = True
            pos += [c, c + 1, c + 1]
        else:
            mask[t:t + n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            pos += list(range(c, c + n))
        t += n
        qs.append(t)
    g = torch.Generator().manual_seed(len(kind))
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=g, dtype=torch.int64).to(i32)
    li = torch.arange(T, dtype=i32) if kind != "decode" else torch.tensor([0, 1, 2], dtype=i32)
    return (ids, torch.tensor(pos, dtype=i32), torch.tensor(tables, dtype=i32), torch.tensor(ctx, dtype=i32),
            torch.tensor(qs, dtype=i32), mask, li)


@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
def test_logits_and_new_kv_match_torch(kind, session, torch_model):
    model, cfg = torch_model
    step = _step(kind, cfg)
    pools = _pool(cfg, 8, 4, seed=1)
    with torch.no_grad():
        logits, nk, nv = model(step[0], step[1], pools[0::2], pools[1::2], *step[2:])
    feeds = dict(zip(step_io.input_names(cfg.num_hidden_layers), [x.numpy() for x in (*step, *pools)]))
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert out["logits"].dtype == np.float32 and out["logits"].shape == tuple(logits.shape)
    assert np.isfinite(out["logits"]).all()
    np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=0)
    for i in range(cfg.num_hidden_layers):
        np.testing.assert_allclose(out[step_io.new_k_name(i)], nk[i].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(out[step_io.new_v_name(i)], nv[i].numpy(), atol=1e-5, rtol=0)


def test_padded_bucket_and_no_logits(session, torch_model):
    """Null-block padding sequences change nothing; a step with no sampled rows is fine."""
    from apar_rt.core import StepInput

    model, cfg = torch_model
    ids, pos, tables, ctx, qs, mask, li = _step("mixed", cfg)
    pools = _pool(cfg, 8, 4, seed=2)
    st = StepInput(ids.numpy(), pos.numpy(), tables.numpy(), ctx.numpy(), qs.numpy(), mask.numpy(),
                   np.zeros(len(ids), np.int32), li.numpy())
    names = step_io.input_names(cfg.num_hidden_layers)
    plain = step_io.step_feeds(st).arrays
    padded = step_io.step_feeds(st, bucket=8).arrays
    assert padded["block_tables"].shape == (8, 3) and (padded["block_tables"][3:] == 0).all()
    assert list(padded["query_start"][3:]) == [len(ids)] * 6
    pool_feeds = dict(zip(names[7:], [p.numpy() for p in pools]))
    a = session.run(["logits"], {**plain, **pool_feeds})[0]
    b = session.run(["logits"], {**padded, **pool_feeds})[0]
    np.testing.assert_array_equal(a, b)
    empty = {**plain, **pool_feeds, "logits_indices": np.zeros(0, np.int32)}
    assert session.run(["logits"], empty)[0].shape == (0, cfg.vocab_size)


def test_mha_tied_embeddings_and_external_data(tiny_mha, tmp_path):
    """MHA + tied embeddings export; weights in external data load and match."""
    import onnxruntime as ort

    from apar_rt.model.weights import load_model

    path, _, _ = tiny_mha
    res = export_onnx(path, tmp_path / "model.onnx", block_size=4, external_data=True)
    assert [f.name for f in res.files] == ["model.onnx", "model.onnx.data"]
    assert res.files[1].stat().st_size > res.files[0].stat().st_size
    onnx.checker.check_model(str(res.path), full_check=True)
    model, cfg = load_model(path)
    step = _step("mixed", cfg)
    pools = _pool(cfg, 8, 4, seed=3)
    with torch.no_grad():
        logits, _, _ = model(step[0], step[1], pools[0::2], pools[1::2], *step[2:])
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(step_io.input_names(cfg.num_hidden_layers), [x.numpy() for x in (*step, *pools)]))
    np.testing.assert_allclose(sess.run(["logits"], feeds)[0], logits.numpy(), atol=1e-4, rtol=0)


def test_export_rejects_bad_arguments(tiny_gqa, tmp_path):
    path, _, _ = tiny_gqa
    with pytest.raises(ValueError, match="dtype"):
        export_onnx(path, tmp_path / "m.onnx", dtype="int8")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(path, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ValueError, match="block_size"):
        export_onnx(path, tmp_path / "m.onnx", block_size=0)
