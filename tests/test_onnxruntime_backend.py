"""The onnxruntime backend against the torch backend: greedy tokens (AR and APAR with forks, under
preemption), per-step logits and KV pools, and the Backend contract's edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apar_rt import LLM, SamplingParams
from apar_rt.backends.onnxruntime_backend import OnnxRuntimeBackend
from apar_rt.backends.torch_backend import TorchBackend
from apar_rt.build.builder import BuildOptions, build
from apar_rt.core import StepInput
from apar_rt.export import step_io

PROMPTS = ["the list of water and sleep", "one two three", "tree fork model data run build code test",
           "first tip", "a plan for food and walk and read"]


def build_engine(model_path, out, **kw):
    kw = {"block_size": 4, "max_batch_size": 8, **kw}
    opts = BuildOptions(model=str(model_path), output=str(out), **kw)
    return build(opts, progress=False, log=lambda m: None).output


@pytest.fixture(scope="module")
def gqa_engine(tiny_gqa, tmp_path_factory):
    path, _, _ = tiny_gqa
    return path, build_engine(path, tmp_path_factory.mktemp("ort") / "gqa")


@pytest.fixture(scope="module")
def mha_engine(tiny_mha, tmp_path_factory):
    path, _, _ = tiny_mha
    return path, build_engine(path, tmp_path_factory.mktemp("ort") / "mha")


def tokens(outs):
    return [o.branches for o in outs]


@pytest.mark.parametrize("which", ["gqa_engine", "mha_engine"])
def test_ar_greedy_matches_torch_under_preemption(request, which):
    model, engine = request.getfixturevalue(which)
    kw = dict(mode="ar", raw=True, num_blocks=15, block_size=4, max_num_tokens=16, max_num_seqs=8)
    ort_llm = LLM(str(engine), backend="onnxruntime", **kw)
    torch_llm = LLM(str(model), backend="torch", dtype="float32", device="cpu", **kw)
    params = SamplingParams(max_tokens=24)
    got, want = ort_llm.generate(PROMPTS, params), torch_llm.generate(PROMPTS, params)
    assert ort_llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert tokens(got) == tokens(want)
    assert [o.text for o in got] == [o.text for o in want]
    assert ort_llm.engine.scheduler.pool.num_used == 0


def test_apar_with_forks_matches_torch_under_preemption(gqa_engine, tiny_gqa):
    model, engine = gqa_engine
    _, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    kw = dict(mode="apar", raw=True, num_blocks=24, block_size=4, max_num_tokens=24, max_num_seqs=8)
    ort_llm = LLM(str(engine), backend="onnxruntime", **kw)
    torch_llm = LLM(str(model), backend="torch", dtype="float32", device="cpu", **kw)
    params = SamplingParams(max_tokens=40, logit_bias={fork: 4.0})
    got, want = ort_llm.generate(PROMPTS[:4], params), torch_llm.generate(PROMPTS[:4], params)
    assert sum(o.stats["forks"] for o in got) >= 4, "the bias was meant to make forks happen"
    assert ort_llm.engine.scheduler.num_preemptions > 0, "the pool was meant to preempt forked requests"
    assert tokens(got) == tokens(want)
    assert [o.text for o in got] == [o.text for o in want]
    assert ort_llm.engine.control.fork == fork   # the manifest's control ids
    assert ort_llm.engine.scheduler.pool.num_used == 0


def test_cut_trees_match_torch_with_small_buckets(gqa_engine, tiny_gqa):
    """The engine's buckets (up to 8 sequences a step) against torch with room for every branch:
    branches advance at other rates, and the trees cut by max_tokens must still be identical."""
    model, engine = gqa_engine
    fork = tiny_gqa[2].convert_tokens_to_ids("[SplitMask]")
    params = SamplingParams(max_tokens=14, logit_bias={fork: 4.0})
    ort_llm = LLM(str(engine), backend="onnxruntime", mode="apar", raw=True, num_blocks=64, max_num_tokens=24)
    torch_llm = LLM(str(model), backend="torch", dtype="float32", device="cpu", mode="apar", raw=True,
                    num_blocks=512, block_size=4, max_num_seqs=64)
    prompts = PROMPTS * 2
    got, want = ort_llm.generate(prompts, params), torch_llm.generate(prompts, params)
    assert ort_llm.engine.config.max_num_seqs == 8
    assert sum(o.finish_reason.value == "length" for o in want) >= 3, "max_tokens was meant to cut trees"
    assert sum(o.stats["forks"] for o in want) >= 3
    assert tokens(got) == tokens(want)
    assert [o.text for o in got] == [o.text for o in want]


class Twin(TorchBackend):
    """The torch backend, also running every step through the onnxruntime backend."""

    def __init__(self, model_dir, engine_dir, bind: str = "direct", bindings: int | None = None):
        super().__init__(str(model_dir), dtype="float32", device="cpu")
        self.other = OnnxRuntimeBackend(str(engine_dir))
        if bindings is not None:   # few IOBindings: later step shapes take over and rebind old ones
            self.other.max_bindings = bindings
        # binds by onnxruntime's pybind object (as installed here), or by its public wrapper
        assert self.other._io._raw is not None, "the installed onnxruntime should take the direct binds"
        if bind == "public":
            self.other._io._raw = None
            self.other._direct_binds = False   # and the IOBindings of later step shapes
        self.diffs: list[tuple[str, float]] = []
        self.shapes: set[tuple[int, int, int]] = set()   # (tokens, logits rows, sequences) of each step

    def allocate_kv(self, num_blocks, block_size):
        super().allocate_kv(num_blocks, block_size)
        self.other.allocate_kv(num_blocks, block_size)

    def execute(self, step: StepInput):
        lens = np.diff(step.query_start)
        kind = "prefill" if (lens > 1).all() else "decode" if (lens == 1).all() else "mixed"
        if step.block_copies:
            kind += "+copy"
        self.shapes.add((len(step.input_ids), len(step.logits_indices), len(step.context_lens)))
        super().execute(step)
        want = self.step_logits()
        got = self.other.forward(step)
        assert isinstance(got, np.ndarray), "on the CPU the onnxruntime backend returns numpy logits"
        assert got.dtype == np.float32 and got.shape == tuple(want.shape)
        self.diffs.append((kind, float(np.abs(got - want.numpy()).max()) if want.numel() else 0.0))


@pytest.mark.parametrize("bind,bindings", [("direct", None), ("public", None), ("direct", 2)])
def test_logits_and_pools_agree_step_by_step(gqa_engine, tiny_gqa, bind, bindings):
    """Every step of an APAR run (prefill, decode, mixed, copy-on-write) within 1e-4 in fp32, with
    either way of binding the step's buffers (`IOBindingCalls`), and with two IOBindings for the
    run's many step shapes (each new shape takes over the older one's and rebinds it)."""
    from apar_rt.config import EngineConfig, ModelConfig
    from apar_rt.engine import Engine
    from apar_rt.model.tokenizer import load_tokenizer

    model, engine = gqa_engine
    _, _, tok = tiny_gqa
    fork = tok.convert_tokens_to_ids("[SplitMask]")
    twin = Twin(model, engine, bind, bindings)
    eng = Engine(twin, load_tokenizer(model), ModelConfig.from_dir(model),
                 EngineConfig(num_blocks=40, block_size=4, max_num_tokens=12, max_num_seqs=8))
    params = SamplingParams(max_tokens=24, logit_bias={fork: 3.0})
    eng.add_request(PROMPTS[0], params, raw=True)
    eng.step()                                  # a prefill-only step
    for p in PROMPTS[1:]:
        eng.add_request(p, params, raw=True)
    while eng.has_unfinished():
        eng.step()
    kinds = {k.split("+")[0] for k, _ in twin.diffs}
    assert kinds == {"prefill", "decode", "mixed"}, kinds
    assert len(twin.shapes) > 2 * (bindings or 1), "the run was meant to switch among many step shapes"
    assert any("+copy" in k for k, _ in twin.diffs), "forks were meant to copy a partial block"
    worst = max(d for _, d in twin.diffs)
    assert worst < 1e-4, twin.diffs
    for a, b in zip(twin.k_caches + twin.v_caches, twin.other.k_caches + twin.other.v_caches):
        np.testing.assert_allclose(b, a.numpy(), atol=1e-5, rtol=0)


def _one_token_step(slot: int, copies=()):
    return StepInput(input_ids=np.array([5], np.int32), positions=np.array([0], np.int32),
                     block_tables=np.array([[1]], np.int32), context_lens=np.array([0], np.int32),
                     query_start=np.array([0, 1], np.int32), mask=np.ones((1, 1), bool),
                     slot_mapping=np.array([slot], np.int32), logits_indices=np.array([0], np.int32),
                     block_copies=list(copies))


def test_negative_slots_are_skipped_and_copies_run_first(gqa_engine):
    _, engine = gqa_engine
    be = OnnxRuntimeBackend(str(engine))
    be.allocate_kv(6, 4)
    assert be.kv_bytes_per_block() == 2 * 2 * 4 * 2 * 16 * 4
    logits = be.forward(_one_token_step(-1))
    assert logits.shape == (1, be.vocab_size)
    assert all(float(np.abs(c).sum()) == 0.0 for c in be.k_caches + be.v_caches), "slot -1 must write nothing"
    be.forward(_one_token_step(4 + 2))          # block 1, offset 2
    assert float(np.abs(be.k_caches[0][1, 2]).sum()) > 0
    assert float(np.abs(be.k_caches[0][1, [0, 1, 3]]).sum()) == 0
    before = be.k_caches[0][1].copy()
    be.forward(_one_token_step(-1, copies=[(1, 3)]))
    np.testing.assert_array_equal(be.k_caches[0][3], before)
    np.testing.assert_array_equal(be.v_caches[1][3], be.v_caches[1][1])


def _chunk_step(slots):
    """One sequence's first len(slots) tokens (a causal chunk), written to `slots` (-1: not written)."""
    T = len(slots)
    return StepInput(input_ids=np.arange(5, 5 + T, dtype=np.int32), positions=np.arange(T, dtype=np.int32),
                     block_tables=np.array([[1, 2]], np.int32), context_lens=np.array([0], np.int32),
                     query_start=np.array([0, T], np.int32), mask=np.tril(np.ones((T, T), bool)),
                     slot_mapping=np.array(slots, np.int32), logits_indices=np.array([T - 1], np.int32),
                     block_copies=[])


@pytest.mark.parametrize("idx, slots", [([0, 1, 2], [5, 6, 7]),                 # one run
                                        ([0, 1, 2, 3], [6, 7, 8, 9]),           # one run over two blocks
                                        ([1, 3, 4], [12, 13, 14]),              # two runs
                                        ([0, 1, 2], [5, 9, 10]),                # tokens in a row, slots not
                                        ([0, 2, 4, 6, 7], [20, 3, 9, 15, 16])])  # more runs than are sliced
def test_committed_kv_is_what_the_step_would_have_written(gqa_engine, idx, slots):
    """commit_kv (a draft tree's accepted nodes) puts token idx[j]'s K/V at slots[j] in every
    layer and nothing anywhere else: the K/V the same step writes itself when its slot mapping
    names a slot for every token."""
    _, engine = gqa_engine
    written, committed = OnnxRuntimeBackend(str(engine)), OnnxRuntimeBackend(str(engine))
    for be in (written, committed):
        be.allocate_kv(6, 4)
    written.forward(_chunk_step([16 + t for t in range(8)]))     # token t at slot 16 + t
    committed.forward(_chunk_step([-1] * 8))
    committed.commit_kv(idx, slots)
    for got, ref in zip(committed.k_caches + committed.v_caches, written.k_caches + written.v_caches):
        got, ref = got.reshape(24, *got.shape[2:]), ref.reshape(24, *ref.shape[2:])
        for i, s in zip(idx, slots):
            np.testing.assert_array_equal(got[s], ref[16 + i])
            assert float(np.abs(ref[16 + i]).sum()) > 0
        others = [s for s in range(24) if s not in slots]
        assert float(np.abs(got[others]).sum()) == 0


def test_huge_pages_move_the_pool_and_change_no_result(gqa_engine):
    """On the CPU the weights and the pool go to huge pages once the pool is allocated (in the
    background); a step gives the same logits and K/V, bit for bit, with and without."""
    _, engine = gqa_engine
    runs = {}
    for on in (True, False):
        be = OnnxRuntimeBackend(str(engine), huge_pages=on)
        be.allocate_kv(8192, 4)                  # an 8 MiB pool
        assert (be.huge_pages.wait() is not None) if on else be.huge_pages is None   # what: test_huge_pages
        runs[on] = (be.forward(_one_token_step(4 + 2)).copy(), be.k_caches[0][1, 2].copy())
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    np.testing.assert_array_equal(runs[True][1], runs[False][1])


def test_step_larger_than_the_largest_bucket_is_a_bug(gqa_engine):
    _, engine = gqa_engine
    be = OnnxRuntimeBackend(str(engine))
    be.allocate_kv(12, 4)
    n = 9
    step = StepInput(input_ids=np.arange(n, dtype=np.int32), positions=np.zeros(n, np.int32),
                     block_tables=np.arange(1, n + 1, dtype=np.int32)[:, None],
                     context_lens=np.zeros(n, np.int32), query_start=np.arange(n + 1, dtype=np.int32),
                     mask=np.ones((n, 1), bool), slot_mapping=np.full(n, -1, np.int32),
                     logits_indices=np.arange(n, dtype=np.int32))
    with pytest.raises(RuntimeError, match="largest batch bucket 8"):
        be.forward(step)


def test_engine_settings_conflicts(gqa_engine):
    model, engine = gqa_engine
    from apar_rt.build.manifest import EngineLoadError

    with pytest.raises(ValueError, match="block size 4"):
        LLM(str(engine), backend="onnxruntime", block_size=16)
    with pytest.raises(ValueError, match="dtype 'float16' differs from the engine's dtype 'float32'"):
        OnnxRuntimeBackend(str(engine), dtype="float16")
    with pytest.raises(EngineLoadError, match="not an apar-rt engine folder"):
        LLM(str(model), backend="onnxruntime")
    with pytest.raises(EngineLoadError, match="engine folder; load it with --backend"):
        LLM(str(engine), backend="torch")
    llm = LLM(str(engine), backend="onnxruntime", max_num_seqs=64, max_num_tokens=100000)
    assert llm.engine.config.max_num_seqs == 8 and llm.engine.config.block_size == 4
    assert llm.engine.config.max_num_tokens == 2048


def test_long_prompts_prefill_in_chunks_of_256_by_default(gqa_engine):
    """On the CPU the engine prefills a long prompt in chunks of PREFILL_CHUNK tokens unless told
    otherwise (its general body costs a chunk's square), with the tokens of the prompt in one chunk."""
    from apar_rt.backends.onnxruntime_backend import PREFILL_CHUNK

    model, engine = gqa_engine
    prompt = list(range(5, 5 + PREFILL_CHUNK + 40))
    params = SamplingParams(max_tokens=6)
    resolved, steps, outs = {}, {}, {}
    for threshold in (None, 0):
        llm = LLM(str(engine), backend="onnxruntime", mode="ar", long_prefill_token_threshold=threshold)
        backend, longest = llm.engine.backend, []
        forward = backend.forward

        def recording_forward(step, forward=forward, longest=longest):
            longest.append(int(np.diff(step.query_start).max()))   # most new tokens of one sequence
            return forward(step)

        backend.forward = recording_forward
        outs[threshold] = tokens(llm.generate(prompt_token_ids=[prompt], params=params))
        resolved[threshold], steps[threshold] = llm.engine.config.long_prefill_token_threshold, longest
    assert resolved == {None: PREFILL_CHUNK, 0: 0}
    assert steps[None][:2] == [PREFILL_CHUNK, 40] and steps[0][0] == PREFILL_CHUNK + 40
    assert outs[None] == outs[0]
    # the long chunks run the general body (the host stores their K/V), the rest the native op's
    # body where the library is built (which stores its own): the tokens are torch's
    torch_llm = LLM(str(model), backend="torch", dtype="float32", device="cpu", mode="ar")
    assert outs[None] == tokens(torch_llm.generate(prompt_token_ids=[prompt], params=params))


@pytest.fixture(scope="module")
def medusa_engine(tmp_path_factory):
    """A tiny model with (untrained, perturbed) Medusa heads, and its engine folder."""
    from apar_rt.medusa.heads import MedusaHeads
    from apar_rt.testing.tiny_model import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_medusa_ort")
    hf, _ = make_tiny_checkpoint(path, seed=3)
    heads = MedusaHeads.init_from_lm_head(hf.lm_head.weight.detach(), num_heads=4)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    heads.save(path / "medusa")
    return path, build_engine(path, tmp_path_factory.mktemp("ort") / "medusa")


def test_medusa_heads_in_the_graph_match_torch(medusa_engine):
    """medusa_logits is an output of the graph; draft-tree verification gives torch's tokens and steps."""
    from apar_rt.build.manifest import verify_engine_dir

    model, engine = medusa_engine
    m = verify_engine_dir(engine)
    assert m.medusa == {"num_heads": 4, "num_layers": 1} and "medusa/config.json" in m.files
    kw = dict(mode="apar", raw=True, num_blocks=40, block_size=4, max_num_seqs=8, medusa=True,
              medusa_tree="tiny_9")
    ort_llm = LLM(str(engine), backend="onnxruntime", **kw)
    torch_llm = LLM(str(model), backend="torch", dtype="float32", device="cpu", **kw)
    assert ort_llm.engine.backend.num_medusa_heads == 4
    params = SamplingParams(max_tokens=30, logit_bias={3: 3.0})
    got, want = ort_llm.generate(PROMPTS, params), torch_llm.generate(PROMPTS, params)
    assert tokens(got) == tokens(want)
    assert [o.stats["decode_steps"] for o in got] == [o.stats["decode_steps"] for o in want]
    assert ort_llm.engine.scheduler.pool.num_used == 0


def test_cpu_logits_are_written_by_the_heads_without_a_copy(medusa_engine):
    """The exporter's Casts of float32 logits to float32 make the graph outputs on disk; onnxruntime
    keeps a node that makes a graph output, so the CPU session graph lets the lm_head MatMul and
    the Medusa heads' Concat write their outputs themselves, in every body of the step (their
    values against torch: the test above). A Cast that does change the type stays."""
    import onnx
    from onnx import TensorProto, helper

    from apar_rt.backends.onnxruntime_backend import _drop_noop_output_casts, _session_model
    from apar_rt.backends.ort_attention import step_bodies

    _, engine = medusa_engine
    on_disk = onnx.load(str(engine / "model.onnx"), load_external_data=False).graph
    made_by = {o: n.op_type for n in on_disk.node for o in n.output}
    assert made_by["logits"] == made_by[step_io.MEDUSA_LOGITS] == "Cast"
    found = step_bodies(onnx.ModelProto.FromString(_session_model(engine / "model.onnx", set(), True)[0]).graph)
    assert len(found) == 3   # decode, small, general
    for body in found:
        made_by = {o: n.op_type for n in body.node for o in n.output}
        assert [made_by[o.name] for o in body.output[:2]] == ["MatMul", "Concat"]
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]),
                           helper.make_node("Cast", ["y"], ["half"], to=TensorProto.FLOAT16)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("half", TensorProto.FLOAT16, [1, 2])], [w])
    assert _drop_noop_output_casts(g) == 0 and [n.op_type for n in g.node] == ["MatMul", "Cast"]


def test_medusa_requested_from_an_engine_without_heads(gqa_engine):
    from apar_rt.backends import BackendUnavailable

    _, engine = gqa_engine
    with pytest.raises(BackendUnavailable, match="built without Medusa heads"):
        OnnxRuntimeBackend(str(engine), medusa_dir="x")


def test_medusa_heads_are_cut_when_not_asked_for(medusa_engine):
    """An engine built with heads but run without Medusa computes no heads, and the same logits."""
    _, engine = medusa_engine
    with_heads = OnnxRuntimeBackend(str(engine), medusa_dir=str(engine))
    without = OnnxRuntimeBackend(str(engine))
    assert with_heads.num_medusa_heads == 4 and without.num_medusa_heads == 0
    assert step_io.MEDUSA_LOGITS not in [o.name for o in without.session.get_outputs()]
    step = _one_token_step(-1)
    for be in (with_heads, without):
        be.allocate_kv(6, 4)
    a, b = with_heads.forward(step).copy(), without.forward(step)
    np.testing.assert_array_equal(a, b)
    assert with_heads.medusa_logits().shape == (1, 4, with_heads.vocab_size)
    with pytest.raises(NotImplementedError, match="no Medusa heads"):
        without.medusa_logits()


def test_medusa_heads_run_apart_on_the_rows_asked_for(medusa_engine):
    """On the CPU the heads leave the step graph (it outputs their input, the hidden states at the
    logits rows) for a model of their own, which medusa_logits_at and medusa_topk run on the rows
    they are asked for: the same logits and ranked ids as torch's heads at those rows (all heads,
    or the first few that `prepare_drafting` names), in rows of a prefill, of two steps of
    different sizes, and the step's own logits unchanged. (Drafting's int8 heads, the default,
    are checked against their dequantized oracle in tests/test_ort_medusa.py.)"""
    model, engine = medusa_engine
    be = OnnxRuntimeBackend(str(engine), medusa_dir=str(engine), int8_drafting=False)
    ref = TorchBackend(str(model), dtype="float32", device="cpu", medusa_dir=str(model / "medusa"))
    outs = [o.name for o in be.session.get_outputs()]
    assert step_io.MEDUSA_LOGITS not in outs and be._heads_input in outs
    assert [o.name for o in be._heads.graph.output] == [step_io.MEDUSA_LOGITS]
    assert be.num_medusa_heads == 4
    for x in (ref, be):
        x.allocate_kv(8, 4)
    asked = []
    run = be._run_heads
    be._run_heads = lambda hidden: asked.append(len(hidden)) or run(hidden)
    for n, rows in ((5, [4, 1]), (3, [2])):
        mask = np.tril(np.ones((n, n), bool))
        step = StepInput(input_ids=np.array([3, 9, 4, 7, 1][:n], np.int32), positions=np.arange(n, dtype=np.int32),
                         block_tables=np.array([[1, 2]], np.int32), context_lens=np.array([0], np.int32),
                         query_start=np.array([0, n], np.int32), mask=mask,
                         slot_mapping=np.full(n, -1, np.int32), logits_indices=np.arange(n, dtype=np.int32))
        np.testing.assert_allclose(be.forward(step), ref.forward(step).numpy(), atol=1e-4)
        want = ref.medusa_logits()[rows].numpy()
        np.testing.assert_allclose(be.medusa_logits_at(rows), want, atol=1e-4)
        np.testing.assert_allclose(be.medusa_logits()[rows], want, atol=1e-4)
        np.testing.assert_array_equal(be.medusa_topk(rows, 3), ref.medusa_topk(rows, 3))
        be.prepare_drafting(2)
        np.testing.assert_array_equal(be.medusa_topk(rows, 4, 2), ref.medusa_topk(rows, 4, 2))
        be.prepare_drafting(4)
    assert asked == [2, 5, 1, 3]   # each call ran the heads on its own rows only (drafting ranks apart)


def test_bound_inputs_outlive_the_callers_arrays(gqa_engine):
    """onnxruntime keeps only pointers: the step inputs must live in buffers the backend owns until
    the run returns (the CUDA path once bound temporaries freed at once). Freeing the caller's
    arrays and churning the allocator between binding and running must change nothing."""
    import gc

    model, engine = gqa_engine
    ref = TorchBackend(str(model), dtype="float32", device="cpu")
    be = OnnxRuntimeBackend(str(engine))
    for x in (ref, be):
        x.allocate_kv(8, 4)
    n = 5
    mask = np.tril(np.ones((n, n), bool))
    step = StepInput(input_ids=np.array([3, 9, 4, 7, 1], np.int32), positions=np.arange(n, dtype=np.int32),
                     block_tables=np.array([[1, 2]], np.int32), context_lens=np.array([0], np.int32),
                     query_start=np.array([0, n], np.int32), mask=mask,
                     slot_mapping=np.full(n, -1, np.int32), logits_indices=np.arange(n, dtype=np.int32))
    want = ref.forward(step)
    feeds = be._step_feeds(step)
    feeds.arrays = {k: v.copy() for k, v in feeds.arrays.items()}
    switched = be._use_binding((feeds.num_tokens, feeds.num_logits, feeds.batch))
    be._stage_inputs(feeds, switched)
    be._bind_outputs(feeds.num_tokens, feeds.num_logits, switched)
    sizes = [arr.nbytes for arr in feeds.arrays.values()]
    for arr in feeds.arrays.values():
        arr[...] = 0 if arr.dtype != np.bool_ else False   # poison the caller's copies, then free them
    del feeds, arr
    gc.collect()
    churn = [np.full(n, 0x41, np.uint8) for n in sizes for _ in range(50)]   # reuse freed memory
    be._run()
    del churn
    torch.testing.assert_close(torch.from_numpy(be._logits).clone(), want, atol=1e-4, rtol=0)


def test_outputs_reuse_persistent_buffers(gqa_engine):
    _, engine = gqa_engine
    be = OnnxRuntimeBackend(str(engine))
    be.allocate_kv(6, 4)
    first = be.forward(_one_token_step(-1)).ctypes.data
    new_kv = be._new_kv.ctypes.data
    assert be.forward(_one_token_step(-1)).ctypes.data == first
    assert be._new_kv.ctypes.data == new_kv


@pytest.mark.parametrize("which", ["gqa_engine", "mha_engine"])
def test_rotary_embeddings_are_fused_for_the_cpu(request, which):
    """Each layer's q and k rope becomes one RotaryEmbedding in the graph the CPU session runs
    (the step-by-step test above checks that graph's logits against torch)."""
    import onnx

    from apar_rt.backends.onnx_graph import constants
    from apar_rt.backends.onnxruntime_backend import _session_model
    from apar_rt.backends.ort_attention import step_bodies
    from apar_rt.config import ModelConfig

    model, engine = request.getfixturevalue(which)
    layers = ModelConfig.from_dir(model).num_hidden_layers
    main = onnx.ModelProto.FromString(_session_model(engine / "model.onnx", set(), True)[0]).graph
    bodies = step_bodies(main)   # a decode step's body, a small step's and any other step's
    assert len(bodies) == 3
    for graph in bodies:
        ops = [n.op_type for n in graph.node]
        assert ops.count("RotaryEmbedding") == 2 * layers
        consts = constants(graph)
        swaps = [n for n in graph.node if n.op_type == "Gather" and n.input[1] in consts
                 and consts[n.input[1]].ndim == 1 and consts[n.input[1]][0] > 0]   # rotate-half index gathers
        assert not swaps and "Sin" in ops       # the step's tables are still computed in the graph
        assert "Neg" not in ops                 # ... but taken as c and s, before the exporter doubles them
    on_disk = onnx.load(str(engine / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "RotaryEmbedding" for n in on_disk.node)


@pytest.mark.parametrize("which", ["gqa_engine", "mha_engine"])
def test_residual_adds_and_rms_norms_are_fused_for_the_cpu(request, which):
    """Every residual add and the RMSNorm after it become one SkipSimplifiedLayerNormalization in
    the graph the CPU session runs (2 per layer: after attention, and before the next layer or the
    final norm), its sum read by the next add; no Pow is left but the first layer's input norm's
    (no add before it). The step-by-step test above checks the logits against torch."""
    import onnx

    from apar_rt.backends.onnxruntime_backend import _session_model
    from apar_rt.backends.ort_attention import step_bodies
    from apar_rt.config import ModelConfig

    model, engine = request.getfixturevalue(which)
    layers = ModelConfig.from_dir(model).num_hidden_layers
    for graph in step_bodies(onnx.ModelProto.FromString(_session_model(engine / "model.onnx", set(), True)[0]).graph):
        fused = [n for n in graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
        assert len(fused) == 2 * layers
        assert [n.op_type for n in graph.node].count("Pow") == 1
        readers = {i for n in graph.node for i in n.input}
        assert all(n.output[3] in readers for n in fused[:-1]), "each sum feeds the next residual add"


def test_a_norm_whose_parts_are_read_elsewhere_is_left_alone():
    """The fusion takes a chain only when nothing else reads its intermediates."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from apar_rt.backends.ort_norms import fuse_skip_rms_norm

    def c(name, v):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32), name))

    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Cast", ["s"], ["c"], to=TensorProto.FLOAT),
             c("two", 2.0), helper.make_node("Pow", ["c", "two"], ["p"]),
             helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([-1], np.int64), "axes")),
             helper.make_node("ReduceMean", ["p", "axes"], ["r"], keepdims=1), c("eps", 1e-5),
             helper.make_node("Add", ["r", "eps"], ["e"]), helper.make_node("Sqrt", ["e"], ["q"]), c("one", 1.0),
             helper.make_node("Div", ["one", "q"], ["d"]), helper.make_node("Mul", ["c", "d"], ["m"]),
             helper.make_node("Cast", ["m"], ["m2"], to=TensorProto.FLOAT), helper.make_node("Mul", ["w", "m2"], ["out"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("a", "b")]
    w = numpy_helper.from_array(np.ones(4, np.float32), "w")

    def model(extra_output=None):
        outs = ["out"] + ([extra_output] if extra_output else [])
        g = helper.make_graph(list(nodes), "g", io, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                              [w])
        if extra_output:   # another node reads an intermediate
            g.node.append(helper.make_node("Neg", [extra_output], [extra_output + "_neg"]))
        return helper.make_model(g)

    assert fuse_skip_rms_norm(model()) == 1
    for inner in ("p", "d", "m"):
        assert fuse_skip_rms_norm(model(inner)) == 0
    fused = model()
    fuse_skip_rms_norm(fused)
    assert [(n.op_type, list(n.input), list(n.output)) for n in fused.graph.node if n.op_type != "Constant"] == [
        ("SkipSimplifiedLayerNormalization", ["a", "b", "w"], ["out", "", "", "c"])]


def test_decode_steps_run_on_the_native_op(gqa_engine, tiny_gqa):
    """With the native op library built, a float32 engine's decode body holds one native
    TreePagedAttentionRope node per layer (attention and rotary) and no Gather of the pools, and
    takes every step of at most
    SMALL_MAX_QUERY tokens per sequence (here all: short prompts); an APAR run with forks gives
    the standard-op body's greedy trees, and each step's logits within 1e-4 of its."""
    import onnx

    from apar_rt.backends import ort_native
    from apar_rt.backends.onnxruntime_backend import _session_model
    from apar_rt.backends.ort_attention import step_bodies
    from apar_rt.engine import Engine
    from apar_rt.testing.native import library_or_skip

    lib = library_or_skip()
    _, engine = gqa_engine
    be = OnnxRuntimeBackend(str(engine))
    assert be.native_ops == lib
    assert OnnxRuntimeBackend(str(engine), native_ops=False).native_ops is None
    bodies = step_bodies(onnx.load_from_string(_session_model(engine / "model.onnx", set(), True, native=True)[0]).graph)
    assert len(bodies) == 2, "the native body and the general one (no small-step body)"
    decode = bodies[0]
    ops = [(n.domain, n.op_type) for n in decode.node]
    # each layer's attention and its q and k rotary are one node (the rotated keys are its 2nd output)
    assert ops.count((ort_native.OP_DOMAIN, ort_native.ROPE_OP_TYPE)) == be.num_layers
    assert not [op for op in ops if op[1] in ("RotaryEmbedding", ort_native.OP_TYPE, "Range")], "nor their position ids"
    natives = [n for n in decode.node if n.op_type == ort_native.ROPE_OP_TYPE]
    readers = {i: n.op_type for n in decode.node for i in n.input}
    assert all(readers[n.output[0]] == "MatMul" for n in natives), "the output projection reads the op's [T, Hq * D]"
    assert not [n for n in decode.node if n.op_type == "Gather" and n.input[0].startswith(("k_cache", "v_cache"))]

    fork = tiny_gqa[2].convert_tokens_to_ids("[SplitMask]")
    runs = {}
    for native in (True, False):
        eng = Engine.from_pretrained(str(engine), backend="onnxruntime", device="cpu", mode="apar",
                                     backend_options={"native_ops": native}, max_num_seqs=8)
        logits, fw, feeds = [], eng.backend.forward, eng.backend._step_feeds
        eng.backend.forward = lambda s, fw=fw: (logits.append(np.array(fw(s))), logits[-1])[1]
        taken = []
        eng.backend._step_feeds = lambda s, f=feeds: (taken.append(f(s)), taken[-1])[1]
        ids = [eng.encode(p, raw=True) for p in PROMPTS]
        for i in ids:
            eng.add_request(None, SamplingParams(max_tokens=32, logit_bias={fork: 3.0}), prompt_token_ids=i)
        outs = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o.branches
        runs[native] = outs, logits, eng.scheduler.num_forks
        if native:
            assert all(bool(f.arrays["apar_decode"][0]) for f in taken), "every step fits the native body"
    assert runs[True][0] == runs[False][0]
    assert runs[True][2] > 0, "the run was meant to fork"
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_a_broken_native_library_is_a_clear_error(gqa_engine, tmp_path, monkeypatch):
    """A library that is not one (a truncated or tampered file) named by APAR_RT_ORT_OPS refuses
    the engine with a message naming it and the way out; `off` runs the standard-op bodies; a
    runtime older than the library's API is not offered it."""
    from apar_rt.backends import ort_native
    from apar_rt.backends.base import BackendUnavailable

    _, engine = gqa_engine
    bad = tmp_path / "libapar_ort_ops.so"
    bad.write_bytes(b"\x7fELF" + b"\0" * 60)
    monkeypatch.setenv(ort_native.ENV_VAR, str(bad))
    with pytest.raises(BackendUnavailable, match=r"cannot load the native op library .*libapar_ort_ops.so.*=off"):
        OnnxRuntimeBackend(str(engine))
    monkeypatch.setenv(ort_native.ENV_VAR, "off")
    assert OnnxRuntimeBackend(str(engine)).native_ops is None
    monkeypatch.setenv(ort_native.ENV_VAR, str(tmp_path / "absent.so"))
    with pytest.raises(FileNotFoundError, match="absent.so is not a file"):
        ort_native.library()
    monkeypatch.delenv(ort_native.ENV_VAR)
    assert ort_native.library("1.20.1") is None
