"""Our Llama + tree_paged_attention against transformers' LlamaForCausalLM (fp32, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apar_rt.model.weights import load_model
from apar_rt.testing.tiny_model import make_tiny_checkpoint

ATOL = 1e-4


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


def empty_pool(cfg, num_blocks, block_size, fill=None):
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    g = torch.Generator().manual_seed(7)
    make = (lambda: torch.randn(shape, generator=g) * 100) if fill == "garbage" else (lambda: torch.zeros(shape))
    return [make() for _ in range(cfg.num_hidden_layers)], [make() for _ in range(cfg.num_hidden_layers)]


def write(pool, new, slots):
    for cache, x in zip(pool, new):
        cache.view(-1, *cache.shape[2:])[torch.tensor(slots)] = x


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.fixture(params=["tiny_gqa", "tiny_mha"])
def ckpt(request):
    path, hf, tok = request.getfixturevalue(request.param)
    model, cfg = load_model(path)
    return model, cfg, hf


def test_prefill_logits(ckpt):
    model, cfg, hf = ckpt
    ids = list(range(5, 5 + 23))
    T = len(ids)
    kc, vc = empty_pool(cfg, 8, 4, fill="garbage")
    with torch.no_grad():
        logits, _, _ = model(i32(ids), i32(range(T)), kc, vc, i32([[0] * 6]), i32([0]), i32([0, T]),
                             torch.tril(torch.ones(T, T, dtype=torch.bool)), i32(range(T)))
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_with_shuffled_block_table(ckpt, block_size):
    """Prefill into a permuted, non-contiguous block table, then decode token by token."""
    model, cfg, hf = ckpt
    rng = np.random.default_rng(block_size)
    ids = rng.integers(3, cfg.vocab_size, size=30).tolist()
    n_prompt, total = 11, len(ids)
    nb = -(-total // block_size)
    table = (rng.permutation(np.arange(1, nb + 6))[:nb]).tolist()  # skips some blocks, never block 0
    kc, vc = empty_pool(cfg, nb + 6, block_size, fill="garbage")
    slot = lambda p: table[p // block_size] * block_size + p % block_size  # noqa: E731
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        lg, nk, nv = model(i32(ids[:n_prompt]), i32(range(n_prompt)), kc, vc, i32([table]), i32([0]),
                           i32([0, n_prompt]), torch.tril(torch.ones(n_prompt, n_prompt, dtype=torch.bool)),
                           i32([n_prompt - 1]))
        torch.testing.assert_close(lg[0], ref[n_prompt - 1], atol=ATOL, rtol=0)
        write(kc, nk, [slot(p) for p in range(n_prompt)])
        write(vc, nv, [slot(p) for p in range(n_prompt)])
        for p in range(n_prompt, total):
            lg, nk, nv = model(i32([ids[p]]), i32([p]), kc, vc, i32([table]), i32([p]), i32([0, 1]),
                               torch.ones(1, 1, dtype=torch.bool), i32([0]))
            torch.testing.assert_close(lg[0], ref[p], atol=ATOL, rtol=0)
            write(kc, nk, [slot(p)])
            write(vc, nv, [slot(p)])


def test_mixed_packed_step_matches_separate_sequences(ckpt):
    """A prefill chunk and two decodes of different sequences in one packed step."""
    model, cfg, hf = ckpt
    bs = 4
    seqs = [list(range(10, 27)), list(range(40, 49)), list(range(100, 113))]
    cached = [0, 8, 12]            # tokens already in the cache per sequence
    new = [17, 1, 1]               # new tokens this step (a whole prefill, two decodes)
    tables = [[1, 2, 3, 4, 5], [9, 7, 0, 0, 0], [6, 11, 8, 10, 0]]
    kc, vc = empty_pool(cfg, 12, bs, fill="garbage")
    with torch.no_grad():
        for s, n, t in zip(seqs, cached, tables):   # fill the cache through the op itself
            if n:
                _, nk, nv = model(i32(s[:n]), i32(range(n)), kc, vc, i32([t]), i32([0]), i32([0, n]),
                                  torch.tril(torch.ones(n, n, dtype=torch.bool)), i32([n - 1]))
                slots = [t[p // bs] * bs + p % bs for p in range(n)]
                write(kc, nk, slots)
                write(vc, nv, slots)
        ids, pos, mask_rows, qs, last = [], [], [], [0], []
        max_q = max(new)
        for s, c, n in zip(seqs, cached, new):
            ids += s[c:c + n]
            pos += list(range(c, c + n))
            m = torch.zeros(n, max_q, dtype=torch.bool)
            m[:, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            mask_rows.append(m)
            qs.append(qs[-1] + n)
            last.append(qs[-1] - 1)
        lg, _, _ = model(i32(ids), i32(pos), kc, vc, i32(tables), i32(cached), i32(qs), torch.cat(mask_rows),
                         i32(last))
    for row, s, c, n in zip(lg, seqs, cached, new):
        torch.testing.assert_close(row, hf_logits(hf, s[:c + n])[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["rope_linear", "rope_llama3", "sharded", "torch_bin"])
def test_checkpoint_variants(tmp_path, variant):
    kw = {}
    if variant == "rope_linear":
        kw["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    elif variant == "rope_llama3":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    elif variant == "sharded":
        kw["max_shard_size"] = "100KB"
    elif variant == "torch_bin":
        kw["safe_serialization"] = False
    hf, _ = make_tiny_checkpoint(tmp_path, seed=3, **kw)
    if variant == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    if variant == "torch_bin":
        bins = list(tmp_path.glob("*.bin"))
        if not bins:  # transformers 5 always writes safetensors; make the .bin form ourselves
            from safetensors.torch import load_file
            torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
            (tmp_path / "model.safetensors").unlink()
    model, cfg = load_model(tmp_path)
    ids = list(range(3, 3 + 40))
    T = len(ids)
    kc, vc = empty_pool(cfg, 12, 4)
    with torch.no_grad():
        lg, _, _ = model(i32(ids), i32(range(T)), kc, vc, i32([list(range(1, 11))]), i32([0]), i32([0, T]),
                         torch.tril(torch.ones(T, T, dtype=torch.bool)), i32(range(T)))
    torch.testing.assert_close(lg, hf_logits(hf, ids), atol=ATOL, rtol=0)
