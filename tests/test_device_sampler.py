"""The torch sampler (backends/torch_sampler.py; on CPU tensors here, the same code as on CUDA)
against the numpy reference (apar_rt/sampler.py), and the engine with either.

The oracle is the reference for the same uniforms: tokens and ok flags must be equal, probes and
entropies equal to rounding. The reference itself is checked against a plain per-row definition
in tests/test_sampler.py (and here where ties meet the candidate edge)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from apar_rt import LLM, SamplingParams
from apar_rt.backends.base import Backend
from apar_rt.backends.torch_sampler import DeviceSampler
from apar_rt.core import SamplingParams as SP
from apar_rt.medusa.tree import MedusaTree, load_tree
from apar_rt.medusa.verifier import Acceptance, MedusaVerifier
from apar_rt.sampler import SamplingBatch, kept_probs, make_generator, process, ranked_top_k, sample
from apar_rt.testing.sampling import random_case

CPU = DeviceSampler(torch.device("cpu"))


def assert_same(ref, got):
    assert np.array_equal(got.ok, ref.ok)
    assert np.array_equal(got.tokens, ref.tokens), np.nonzero(got.tokens != ref.tokens)
    np.testing.assert_allclose(got.probes, ref.probes, rtol=1e-5, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(got.entropy, ref.entropy, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_device_sampler_equals_the_reference_on_random_mixed_batches():
    rng = np.random.default_rng(0)
    rows_seen = invalid = 0
    for trial in range(150):
        x, rows, batch = random_case(rng)
        ref = sample(x[rows], batch)
        got = CPU.sample(torch.from_numpy(x), rows, batch)
        assert_same(ref, got)
        rows_seen += len(batch)
        invalid += int((~ref.ok).sum())
    assert rows_seen > 2500 and invalid > 50


def test_large_vocabularies_equal_the_device_sampler():
    """At 6,000 and 20,000 tokens (top-k and top-p rows held at their candidate ids, nuclei
    past the candidates) the tokens are the device sampler's."""
    rng = np.random.default_rng(8)
    for trial in range(8):
        x, rows, batch = random_case(rng, V=int(rng.choice([6000, 20000])), R=24)
        assert_same(sample(x[rows], batch), CPU.sample(torch.from_numpy(x), rows, batch))


def test_all_greedy_batches_without_probes_give_the_reference_tokens():
    rng = np.random.default_rng(5)
    for trial in range(40):
        x, rows, batch = random_case(rng)
        batch.temperature = [0.0] * len(batch)
        batch.probes = []
        assert_same(sample(x[rows], batch), CPU.sample(torch.from_numpy(x), rows, batch))


def test_selected_batches_sample_as_their_rows_in_the_whole():
    """Rows depend only on their own logits, parameters and uniform: a selection of a batch (the
    engine's request-by-request retry) samples the same tokens and probes as those rows did in
    the whole batch."""
    rng = np.random.default_rng(6)
    for trial in range(30):
        x, rows, batch = random_case(rng, R=int(rng.integers(2, 30)))
        whole = sample(x[rows], batch)
        pick = sorted(rng.choice(len(batch), size=int(rng.integers(1, len(batch))), replace=False).tolist())
        sub, probe_idx = batch.select(pick)
        part = CPU.sample(torch.from_numpy(x), rows[pick], sub)
        assert np.array_equal(part.tokens, whole.tokens[pick]) and np.array_equal(part.ok, whole.ok[pick])
        np.testing.assert_allclose(part.probes, whole.probes[probe_idx], rtol=1e-5, atol=1e-7, equal_nan=True)


def test_the_pass_takes_half_precision_logits_as_the_reference_takes_them():
    rng = np.random.default_rng(1)
    x, rows, batch = random_case(rng)
    half = torch.from_numpy(x).to(torch.bfloat16)
    assert_same(sample(half.float().numpy()[rows], batch), CPU.sample(half, rows, batch))


def test_ties_at_the_candidate_edge_go_to_the_lower_id():
    """All 1000 logits equal: top_k=2 keeps tokens 0 and 1 (the partition alone would keep an
    arbitrary pair); top-p on a flat row keeps the lowest ids."""
    x = np.zeros((1, 1000), np.float32)
    for p, want in ((SP(temperature=1.0, top_k=2), {0, 1}), (SP(temperature=1.0, top_k=70), set(range(70))),
                    (SP(temperature=1.0, top_p=0.003), {0, 1, 2})):
        q = kept_probs(x, np.array([p.temperature]), np.array([p.top_k]), np.array([p.top_p]))[0]
        assert set(np.nonzero(q)[0].tolist()) == want
        batch = SamplingBatch()
        g = make_generator(0)
        for _ in range(200):
            batch.add(p, (), g)
        tokens = np.tile(x, (200, 1))
        ref = sample(tokens, batch)
        drawn = set(ref.tokens.tolist())
        assert drawn <= want and len(drawn) >= min(len(want), 30)
        assert_same(ref, CPU.sample(torch.from_numpy(tokens), np.arange(200), batch))


def test_ranked_top_k_equals_the_reference_with_ties():
    rng = np.random.default_rng(2)
    for trial in range(40):
        V = int(rng.choice([5, 64, 500]))
        x = (rng.standard_normal((9, V)) * 2).astype(np.float32)
        x[::3] = np.round(x[::3])
        x[1] = 0.0
        x[4, ::2] = -0.0
        k = int(rng.choice([1, 3, 10, V, V + 3]))
        want = ranked_top_k(x, k)
        for row, ids in zip(x, want):   # the definition: by value, largest first, ties to the lower id
            assert ids.tolist() == sorted(range(V), key=lambda t: (-float(row[t]), t))[:k]
        assert np.array_equal(CPU.ranked_top_k(torch.from_numpy(x), k), want)


# ---- Medusa verification on the device path ------------------------------------------------------

def device_verify(ver, logits, root, draft, params, banned, generator):
    batch = SamplingBatch()
    rows = ver.add_tree(batch, root, draft, params, banned, generator)
    return ver.accept(CPU.sample(torch.from_numpy(logits), np.arange(len(batch)), batch), rows)


def kept_set(x_row, params):
    q = kept_probs(x_row[None, :], np.array([params.temperature]), np.array([params.top_k]),
                   np.array([params.top_p]))[0]
    return set(np.nonzero(q > 0)[0].tolist())


@pytest.mark.parametrize("tree_name", ["tiny_9", "mc_sim_7b_63"])
def test_typical_acceptance_on_the_device_path_stays_in_top_k_top_p(tree_name):
    """Every accepted draft token and every bonus token is in its parent's kept set, and the
    device path accepts exactly what the host path accepts."""
    tree = load_tree(tree_name)
    ver = MedusaVerifier(tree, Acceptance("typical"))
    rng = np.random.default_rng(3)
    V, accepted = 50, 0
    for trial in range(60):
        params = SP(temperature=float(rng.choice([0.5, 1.0])), top_k=int(rng.choice([0, 2, 5])),
                    top_p=float(rng.choice([0.4, 0.8, 1.0])), seed=trial)
        logits = (rng.standard_normal((tree.size, V)) * 2).astype(np.float32)
        hot = rng.integers(0, V, 3)                               # drafts from a few likely tokens
        logits[:, hot] += 3.0
        draft = [int(rng.choice(hot)) if rng.random() < 0.8 else int(rng.integers(0, V))
                 for _ in range(tree.num_nodes)]
        def banned(last):
            return [7] if last % 2 else []
        tokens, nodes = device_verify(ver, logits, 1, draft, params, banned, make_generator(trial))
        want = ver.verify(logits, 1, draft, params, banned, make_generator(trial))
        assert (tokens, nodes) == want
        node_tokens = [1, *draft]
        odd = [i for i in range(tree.size) if node_tokens[i] % 2]   # nodes after an odd token ban 7
        x = process(logits, SamplingBatch([1.0] * tree.size, [0] * tree.size, [1.0] * tree.size,
                                          [0.0] * tree.size, [], [(r, (7,)) for r in odd]))
        for tok, parent in zip(tokens, nodes):
            assert tok in kept_set(x[parent], params)
        accepted += len(nodes) - 1
    assert accepted > 20, "the test should accept drafts"


def test_greedy_tree_verification_on_the_device_path_by_hand():
    tree = MedusaTree.from_choices([[0], [1], [0, 0], [1, 0]])
    ver = MedusaVerifier(tree, Acceptance("greedy"))
    logits = np.zeros((tree.size, 10), np.float32)
    logits[0, 5] = 9
    logits[2, 7] = 9
    logits[4, 1] = 9
    assert device_verify(ver, logits, 4, [6, 5, 8, 7], SP(), lambda last: [], None) == ([5, 7, 1], [0, 2, 4])
    tokens, nodes = device_verify(ver, logits, 4, [6, 5, 8, 7], SP(), lambda last: [5] if last == 4 else [],
                                  None)
    assert nodes == [0] and tokens[0] != 5


# ---- the engine: device sampler vs the reference ---------------------------------------------------

def with_reference_sampler(llm):
    """The same engine, sampling with the numpy reference over host logits (Backend's default)."""
    be = llm.engine.backend
    be.sample = types.MethodType(Backend.sample, be)
    be.medusa_topk = types.MethodType(Backend.medusa_topk, be)
    return llm


PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read", "x y"]


def mixed_requests(fork):
    return [SamplingParams(max_tokens=24, logit_bias={fork: 4.0}),
            SamplingParams(max_tokens=24, temperature=0.9, seed=1),
            SamplingParams(max_tokens=24, temperature=1.3, top_k=5, seed=2, logit_bias={fork: 2.0}),
            SamplingParams(max_tokens=24, temperature=0.7, top_p=0.8, seed=3),
            SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=4),
            SamplingParams(max_tokens=24)]


def test_engine_outputs_are_the_same_with_the_device_sampler_and_the_reference(tiny_gqa):
    path, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    params = mixed_requests(fork)
    device = LLM(str(path), dtype="float32", device="cpu", raw=True)
    assert type(device.engine.backend).sample is not Backend.sample
    ref = with_reference_sampler(LLM(str(path), dtype="float32", device="cpu", raw=True))
    a, b = device.generate(PROMPTS, params), ref.generate(PROMPTS, params)
    assert [o.branches for o in a] == [o.branches for o in b]
    assert [o.text for o in a] == [o.text for o in b]
    assert sum(o.stats["forks"] for o in a) >= 2
    c = device.generate(PROMPTS, params)                          # seeded: the same again
    assert [o.branches for o in c] == [o.branches for o in a]
    # a bad row fails its own request on the device path too
    poisoned = SamplingParams(max_tokens=8, temperature=0.8, seed=3)
    object.__setattr__(poisoned, "logit_bias", ((5, math.nan),))
    outs = device.generate(PROMPTS[:2] + ["x"], params[:2] + [poisoned])
    assert [o.branches for o in outs[:2]] == [o.branches for o in a[:2]]
    assert outs[2].finish_reason.value == "error" and "not finite" in outs[2].error


def test_a_pass_that_raises_is_retried_request_by_request_and_fails_only_its_request(tiny_gqa):
    """A backend whose batched pass raises on one request's rows (a bias value stands in for a
    device fault): the engine samples request by request, that request fails with an internal
    error, and the others finish exactly as in a clean run."""
    from apar_rt.backends.torch_backend import TorchBackend
    from apar_rt.config import EngineConfig, ModelConfig
    from apar_rt.engine import Engine
    from apar_rt.model.tokenizer import load_tokenizer

    class Faulty(TorchBackend):
        def sample(self, rows, batch):
            if any(v == 77.0 for _, _, v in batch.bias):
                raise RuntimeError("device fault")
            return super().sample(rows, batch)

    path, _, tok = tiny_gqa
    params = mixed_requests(tok.convert_tokens_to_ids("[SplitMask]"))
    clean = LLM(str(path), dtype="float32", device="cpu", raw=True).generate(PROMPTS, params)
    llm = LLM.__new__(LLM)
    llm.raw = True
    llm.engine = Engine(Faulty(str(path), dtype="float32", device="cpu"), load_tokenizer(path),
                        ModelConfig.from_dir(path), EngineConfig())
    bad = SamplingParams(max_tokens=24, temperature=0.5, seed=9, logit_bias={5: 77.0})
    outs = llm.generate(PROMPTS[:3] + ["x"] + PROMPTS[3:], params[:3] + [bad] + params[3:])
    good = outs[:3] + outs[4:]
    assert [o.branches for o in good] == [o.branches for o in clean]
    assert outs[3].finish_reason.value == "error" and "internal error while sampling" in outs[3].error
    assert llm.engine.scheduler.pool.num_used == 0


def test_bench_sampler_command_runs_and_names_a_bad_device():
    """`apar-rt bench sampler` on tiny sizes (it checks tokens equal on every pass), and a clear
    error for a device this machine lacks."""
    import json

    from click.testing import CliRunner

    from apar_rt.cli import main

    out = CliRunner().invoke(main, ["bench", "sampler", "--rows", "8", "--vocab", "300", "--reps", "1", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [r["case"] for r in rows] == ["greedy", "top-k 50", "top-p 0.9"]
    bad = CliRunner().invoke(main, ["bench", "sampler", "--device", "gpu0"])
    assert bad.exit_code == 2 and "unknown device 'gpu0'; use cpu, cuda or cuda:N" in bad.output
    assert "Traceback" not in bad.output
