"""The engine loop: schedule -> backend.forward -> sample -> scheduler.update, with streaming output."""

from __future__ import annotations

import gc
import itertools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from apar_rt.apar import ControlTokens, branch_schema, recover_text
from apar_rt.backends import Backend, backend_class
from apar_rt.config import EngineConfig, ModelConfig, ModelLoadError
from apar_rt.core import (FinishReason, Request, RequestOutput, RequestStatus, SamplingParams, ScheduledSeq,
                          request_stats)
from apar_rt.detokenizer import TreeText
from apar_rt.medusa.folder import HEADS_DIRNAME, find_heads_dir
from apar_rt.medusa.tree import DEFAULT_TREE, load_tree
from apar_rt.medusa.verifier import Acceptance, MedusaVerifier, TreeRows
from apar_rt.model.byte_table import byte_table
from apar_rt.model.tokenizer import control_tokens, encode_prompt, load_tokenizer
from apar_rt.sampler import Sampled, SamplingBatch, SamplingError, error_message, make_generator
from apar_rt.scheduler import RequestRejected, Scheduler
from apar_rt.stop_filter import for_tokenizer as stop_filter_for
from apar_rt.stop_prefixes import StopPrefixes

log = logging.getLogger(__name__)

YOUNG_GC_THRESHOLD = 10_000   # allocations between young collections once the heap is frozen


def freeze_heap() -> None:
    """Collect garbage once, then move every object alive now (the imported libraries, the loaded
    model) into the collector's permanent generation, as vLLM does after startup.

    Without it, each full collection in the step loop scans all of them: with torch loaded, one
    step in about a hundred at 256 sequences took 80-90 ms instead of 2 (`bench overhead`'s mean).
    Call it before the Engine is made: the engine's own reference cycles (its scheduler holds its
    bound methods) must stay collectable, so that a dropped engine is reclaimed. Objects made
    later (the engine, requests) are collected as usual.

    It also raises the youngest generation's threshold to YOUNG_GC_THRESHOLD allocations (never
    lowers it). A step at 256 sequences makes a few thousand short-lived containers (each
    sequence's schedule entry, delta and output), which at Python's default of 700 ran several
    young collections per step: about 8% of `bench overhead`'s step there. Reference counting
    frees those objects anyway; only cycles wait longer."""
    gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    if 0 < young < YOUNG_GC_THRESHOLD:
        gc.set_threshold(YOUNG_GC_THRESHOLD, *older)


class Engine:
    """Runs requests in flight. `add_request` + repeated `step()`; each step returns the
    requests that progressed, with this step's per-branch token deltas."""

    def __init__(self, backend: Backend, tokenizer, model_config: ModelConfig, config: EngineConfig,
                 control: ControlTokens | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.control = control if control is not None else control_tokens(tokenizer)
        max_len = min(config.max_model_len or model_config.max_position_embeddings,
                      model_config.max_position_embeddings)
        chunk = config.long_prefill_token_threshold
        self.config = replace(config, max_model_len=max_len,
                              long_prefill_token_threshold=backend.preferred_prefill_chunk if chunk is None else chunk)
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | frozenset(self.control.ids)
        # byte-level BPE: text from a table of each token's bytes (None: the tokenizer decodes)
        self.byte_table = byte_table(tokenizer, model_config.vocab_size)
        # clean_up_tokenization_spaces rewrites text across tokens: such text is decoded in full
        self.incremental_text = not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.verifier = self._make_verifier(backend, self.config)
        self.scheduler = Scheduler(self.config, self.control, max_model_len=max_len, eos_token_ids=sorted(eos),
                                   decode=self.decode, special_ids=self.special_ids,
                                   incremental_text=self.incremental_text, byte_table=self.byte_table,
                                   stop_filter=stop_filter_for(tokenizer, self.decode),
                                   tree=self.verifier.tree if self.verifier else None)
        backend.allocate_kv(config.num_blocks, config.block_size)
        if self.verifier is not None:
            backend.prepare_drafting(self.verifier.tree.depth)
        self._requests: dict[str, Request] = {}
        self._batch: tuple | None = None      # the last step's sampling rows, for its replay (_keep_batch)
        self._stop_prefixes: dict[tuple[str, ...], StopPrefixes] = {}   # `stop_prefixes`
        self._ids = itertools.count()
        self.num_steps = 0

    @staticmethod
    def _make_verifier(backend: Backend, config: EngineConfig) -> MedusaVerifier | None:
        if config.medusa_tree is None:
            return None
        if backend.num_medusa_heads == 0:
            raise ValueError("a Medusa tree was given but the backend has no Medusa heads loaded")
        tree = load_tree(config.medusa_tree)
        tree.check_heads(backend.num_medusa_heads)
        return MedusaVerifier(tree, Acceptance(config.acceptance))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, backend: str = "torch", dtype: str | None = "auto",
                        device: str | None = None, medusa: bool | str = False, backend_options: dict | None = None,
                        **engine_kwargs) -> "Engine":
        """Load a HF model folder (torch backend) or an engine folder (built backends).

        medusa: True loads the heads in `<model_dir>/medusa`; a path loads them from there.
        backend_options: extra keyword arguments of the backend class (e.g. onnxruntime's `threads`).
        """
        backend_cls = backend_class(backend)
        backend_kw = dict(backend_options or {})
        if medusa:
            heads_dir = find_heads_dir(model_dir) if medusa is True else Path(medusa)
            if heads_dir is None:
                raise ModelLoadError(f"--medusa: {str(model_dir)!r} has no '{HEADS_DIRNAME}' folder of Medusa "
                                     "heads (train them with `apar-rt train-medusa`)")
            backend_kw["medusa_dir"] = str(heads_dir)
            if engine_kwargs.get("medusa_tree") is None:
                engine_kwargs["medusa_tree"] = DEFAULT_TREE
        control = None
        recorded = None     # an engine folder: only the files its manifest records are read
        if backend != "torch" or Path(model_dir, "manifest.json").is_file():
            from apar_rt.build.manifest import engine_settings, read_manifest  # limits, control ids
            engine_kwargs, control = engine_settings(model_dir, backend, engine_kwargs)
            recorded = list(read_manifest(model_dir).files)
        cfg = EngineConfig(**engine_kwargs)
        model_config = ModelConfig.from_dir(model_dir)
        tokenizer = load_tokenizer(model_dir, only=recorded)
        be = backend_cls(str(model_dir), dtype=dtype, device=device, **backend_kw)
        freeze_heap()
        return cls(be, tokenizer, model_config, cfg, control=control)

    # ---- requests ------------------------------------------------------------------------

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of token ids, special tokens skipped: every text the engine makes is decoded
        here (by a byte table for byte-level BPE tokenizers, model/byte_table.py)."""
        if self.byte_table is not None:
            return self.byte_table.decode(token_ids)
        return self.tokenizer.decode(token_ids if isinstance(token_ids, list) else list(token_ids),
                                     skip_special_tokens=True)

    def encode(self, prompt: str, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw=raw)

    def add_request(self, prompt: str | None, params: SamplingParams, *, prompt_token_ids: list[int] | None = None,
                    raw: bool = False, request_id: str | None = None) -> str:
        """Queue a request; raises ValueError (naming the problem) if it cannot be served."""
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        ids = list(prompt_token_ids) if prompt_token_ids is not None else self.encode(prompt or "", raw=raw)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestRejected(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        for tok, _ in params.logit_bias:
            if not 0 <= tok < vocab:
                raise RequestRejected(f"logit_bias names token {tok}, outside the vocabulary [0, {vocab})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise RequestRejected(f"request id {rid!r} is already in use")
        req = Request(request_id=rid, prompt=prompt if prompt is not None else self.decode(ids),
                      prompt_token_ids=ids, params=params,
                      generator=None if params.greedy else make_generator(params.seed))
        self.scheduler.add(req)
        self._requests[rid] = req
        return rid

    def abort_request(self, request_id: str) -> bool:
        """Abort a request and free its KV blocks; False if unknown or already finished."""
        req = self._requests.pop(request_id, None)
        return bool(req) and self.scheduler.abort(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step. A failure while sampling, verifying, updating or finishing one request
        fails that request alone (finish_reason 'error', with a message saying why); the step goes
        on for the others. A failure of the shared forward pass still raises."""
        out = self.scheduler.schedule()
        # per sampling sequence, in out.seqs order: a plain sequence's new token (an int), a draft
        # tree's accepted run (a list), or () for none (its request finished or failed)
        results: list[int | Sequence[int]] = []
        picks: list[tuple[ScheduledSeq, int, list[int]]] = []   # with Medusa: (seq, first logits row, nodes)
        reuse = None
        if out.step is not None:
            self.backend.execute(out.step)
            reuse = self._reused_batch(out)
        if reuse is not None:   # a replayed step: the last step's rows again (and, as after the last
            # step, no drafts: a step after which drafts are made is never replayed)
            batch, rows, plain_reqs = reuse
            results = self._sample(rows, batch, plain_reqs, [], [], [()] * len(plain_reqs), picks, out)
            self.num_steps += 1
        elif out.step is not None:
            batch = SamplingBatch()
            rows: list[int] = []                      # the logits row of each batch row
            # a plain sequence's batch row is its results index while `dense` holds (no tree and no
            # skipped sequence before it); the others are found through `plain` and `trees`
            plain: list[tuple[int, int, Request]] = []   # (results index, batch row, request), if not dense
            plain_reqs: list[Request] = []               # the request of each batch row, while dense
            # (results index, picks index, first batch row, batch rows, tree, request) per draft
            # tree: `picks` holds every sequence only when drafting, so the two indices differ
            trees: list[tuple[int, int, int, int, TreeRows, Request]] = []
            dense = True
            row = 0
            banned = self.scheduler.banned
            # with Medusa, the sequences `_after_medusa_step` takes: every one when it drafts after
            # this step, else the draft trees alone (their accepted K/V to write, their drafts to drop)
            drafting = self._drafts_after(out)
            add = batch.add
            for s in out.seqs:
                if not s.samples:
                    continue
                req, b = s.request, s.branch
                first = row
                if req.status is not RequestStatus.FINISHED:
                    try:
                        if s.tree:
                            start = len(batch)
                            tree = self.verifier.add_tree(
                                batch, b.token_ids[-1], b.draft, req.params,
                                lambda last, req=req, b=b: banned(req, b, last, out), b.generator)
                            rows.extend(range(first, first + s.num_new))
                            trees.append((len(results), len(picks), start, len(batch) - start, tree, req))
                            dense = False
                        else:
                            last = b.token_ids[-1] if b.token_ids else b.prefix[-1]
                            start = add(req.params, banned(req, b, last, out), b.generator)
                            rows.append(first)
                            if dense:
                                plain_reqs.append(req)
                            else:
                                plain.append((len(results), start, req))
                    except Exception as e:
                        self._fail(req, "sampling", e, out)
                        dense = False
                else:
                    dense = False
                if not dense and plain_reqs:   # from here on, rows are found through `plain`
                    plain += [(i, i, r) for i, r in enumerate(plain_reqs)]
                    plain_reqs = []
                row += s.num_new if s.tree else 1
                results.append(())
                if drafting or s.tree:
                    picks.append((s, first, [] if s.tree else [0]))
            if out.replayable and dense and len(batch) == len(out.seqs):
                self._keep_batch(out, batch, rows, plain_reqs)
            if len(batch):
                results = self._sample(rows, batch, plain_reqs, plain, trees, results, picks, out)
            self.num_steps += 1
        outputs, reqs, finished = self.scheduler.update(
            out, results, on_error=lambda req, e: self._error_message(req, "updating", e))
        if picks:
            self._after_medusa_step(out, picks)
            for o, req in zip(outputs, reqs):   # drafting may have failed a request
                o.finished = req.finished
            finished = [i for i, o in enumerate(outputs) if o.finished]
        for i in finished:
            try:
                self._finish(reqs[i], outputs[i])
            except Exception as e:
                outputs[i] = self._failed_output(reqs[i], e)
        return outputs

    def _keep_batch(self, out, batch: SamplingBatch, rows: list[int], plain_reqs: list[Request]) -> None:
        """Keep a step's sampling rows for the scheduler's replay of it (`_reused_batch`): a step
        whose every sequence sampled one plain row. Its logits rows are kept as the array
        `_sample` reads."""
        if out.feeds_control:
            self._batch = None
            return
        draws = [(r, s.branch.generator) for r, s in enumerate(out.seqs)   # row r is out.seqs[r]'s
                 if batch.temperature[r] != 0.0 and s.branch.generator is not None]
        self._batch = (out.seqs, batch, np.asarray(rows, np.int64), plain_reqs, draws)

    def _reused_batch(self, out) -> tuple | None:
        """For a step the scheduler replayed (`Scheduler._replay_decodes`: the last step's sequences,
        one token further), the last step's sampling rows, which are this step's: the same
        parameters, bias and bans, and for each sampled row a new uniform from its branch's
        generator, drawn in row order as `SamplingBatch.add` draws them. A sequence's bans follow
        its last token only where that is [Fork] or [Child] (`apar.banned_tokens`), so rows are
        kept and reused only for steps that feed neither. None for any other step."""
        kept = self._batch
        if kept is None or not out.replayed or kept[0] is not out.seqs or out.feeds_control:
            self._batch = None
            return None
        _, batch, rows, plain_reqs, draws = kept
        uniform = batch.uniform
        for r, gen in draws:
            uniform[r] = float(gen.random())
        return batch, rows, plain_reqs

    def _sample(self, rows, batch: SamplingBatch, plain_reqs, plain, trees, results, picks, out) -> list:
        """Sample every row of the step (plain rows and draft-tree nodes) in one pass on the
        backend's device (`backend.sample`), then accept each tree; a row without a valid
        distribution fails its own request only. Returns `results` filled in (the sampled tokens
        themselves when every row is a plain sequence's, in order)."""
        rows_a = np.asarray(rows, np.int64)
        try:
            sampled = self.backend.sample(rows_a, batch)
        except Exception as e:   # not expected: find the request whose rows raise, one request at a time
            log.error("batched sampling failed; sampling request by request", exc_info=e)
            jobs = ([(i, 1, r) for i, r in enumerate(plain_reqs)] + [(start, 1, r) for _, start, r in plain]
                    + [(start, n, r) for _, _, start, n, _, r in trees])
            sampled = self._sample_each(rows_a, batch, jobs, out)
        tokens = sampled.tokens.tolist()
        all_ok = bool(sampled.ok.all())
        if plain_reqs and all_ok and not plain and not trees:   # every row a plain sequence's, in order
            return tokens
        ok = sampled.ok.tolist()
        for i, req in enumerate(plain_reqs):
            if all_ok or ok[i]:
                results[i] = tokens[i]
            else:
                self._fail(req, "sampling", SamplingError(error_message(req.params)), out)
        for i, start, req in plain:
            if req.status is RequestStatus.FINISHED:
                continue
            if all_ok or ok[start]:
                results[i] = tokens[start]
            else:
                self._fail(req, "sampling", SamplingError(error_message(req.params)), out)
        for i, p, _, _, tree, req in trees:
            if req.status is RequestStatus.FINISHED:
                continue
            try:
                results[i], nodes = self.verifier.accept(sampled, tree)
                picks[p] = (picks[p][0], picks[p][1], nodes)
            except Exception as e:
                self._fail(req, "sampling", e, out)
        return results

    def _sample_each(self, rows, batch: SamplingBatch, jobs, out) -> Sampled:
        """The pass again, one request's rows at a time (`jobs`: its first batch row, its number of
        rows, the request); a request whose rows still raise fails."""
        tokens = np.full(len(batch), -1, np.int64)
        ok = np.zeros(len(batch), bool)
        probes = np.full(len(batch.probes), np.nan, np.float32)
        entropy = np.full(len(batch), np.nan)
        for start, n, req in jobs:
            idx = list(range(start, start + n))
            sub, probe_idx = batch.select(idx)
            try:
                part = self.backend.sample(rows[start:start + n], sub)
            except Exception as e:
                self._fail(req, "sampling", e, out)
                continue
            tokens[start:start + n], ok[start:start + n] = part.tokens, part.ok
            entropy[start:start + n] = part.entropy
            probes[probe_idx] = part.probes
        return Sampled(tokens, ok, probes, entropy)

    def _fail(self, req: Request, stage: str, e: Exception, out=None) -> None:
        """Fail one request after an error in `stage`; its blocks are freed, the others go on."""
        if not req.finished:
            self.scheduler.fail(req, self._error_message(req, stage, e), out)

    @staticmethod
    def _error_message(req: Request, stage: str, e: Exception) -> str:
        """What the client is told: a SamplingError's own message, else a generic one (logged)."""
        if isinstance(e, SamplingError):
            return str(e)
        log.error("request %s failed while %s", req.request_id, stage, exc_info=e)
        return f"internal error while {stage} this request (details are in the server log)"

    def _failed_output(self, req: Request, e: Exception) -> RequestOutput:
        log.error("request %s failed while finishing", req.request_id, exc_info=e)
        self._requests.pop(req.request_id, None)
        msg = "internal error while finishing this request (details are in the server log)"
        if not req.finished:
            self.scheduler.fail(req, msg, None)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_ids=req.prompt_token_ids, deltas=[], finished=True,
                             finish_reason=FinishReason.ERROR, error=req.error or msg)

    def _drafts_after(self, out) -> bool:
        """Whether threads draft after the step `out`: with Medusa, unless it ran at least
        `speculative_disable_by_batch_size` sequences."""
        limit = self.config.speculative_disable_by_batch_size
        return self.verifier is not None and (limit is None or len(out.seqs) < limit)

    def _after_medusa_step(self, out, picks) -> None:
        """Write the accepted nodes' K/V, then draft each live thread's next tree; no thread drafts
        after a step of at least `speculative_disable_by_batch_size` sequences (its next step
        decodes plainly: where a step is compute-bound, a tree's extra rows cost more than its
        accepted tokens save)."""
        idx: list[int] = []
        slots: list[int] = []
        if any(s.tree for s, _, _ in picks):
            # the step wrote the K/V of the tree's first path (`Scheduler._pack`): the accepted
            # nodes from where the accepted path leaves it are written here
            first = self.verifier.tree.first_path
            offsets = None
            for s, _, nodes in picks:
                if s.tree and s.accepted and not s.request.finished:
                    k = 0
                    while k < s.accepted and k < len(first) and nodes[k] == first[k]:
                        k += 1
                    if k == s.accepted:
                        continue
                    if offsets is None:
                        offsets = dict(zip(map(id, out.seqs), out.step.query_start.tolist()))
                    at = offsets[id(s)]
                    idx += [at + n for n in nodes[k:s.accepted]]
                    slots += s.slots[k:s.accepted]
        if idx:
            self.backend.commit_kv(idx, slots)
        if not self._drafts_after(out):
            for s, _, _ in picks:
                s.branch.draft = None
            return
        want = [(s, row + nodes[s.accepted - 1]) for s, row, nodes in picks
                if s.accepted and not s.branch.finished and self.verifier.drafts_for(s.request.params)]
        if not want:
            return
        self.scheduler.drafts_made()
        k, heads = self.verifier.max_rank, self.verifier.tree.depth
        try:
            ranked = self.backend.medusa_topk([r for _, r in want], k, heads)
        except Exception as e:   # not expected: draft row by row, failing only the request that raises
            log.error("batched drafting failed; drafting row by row", exc_info=e)
            ranked = None
        if ranked is not None:
            ranked = ranked.tolist()
        for j, (s, r) in enumerate(want):
            try:
                top = ranked[j] if ranked is not None else self.backend.medusa_topk([r], k, heads)[0]
                s.branch.draft = self.verifier.draft(top)
            except Exception as e:
                self._fail(s.request, "drafting for", e)

    def _finish(self, req: Request, o: RequestOutput) -> None:
        """Complete the step's output `o` of `req`, which finished in the step."""
        o.finish_reason, o.error = req.finish_reason, req.error
        self._requests.pop(req.request_id, None)
        self.finalize(req, o)

    def text_of(self, req: Request) -> TreeText:
        """The request's incremental text (made on first use): the streamer grows it each step,
        `finalize` renders the final text from it."""
        if req.detok is None:
            req.detok = TreeText(self.decode, self.special_ids, incremental=self.incremental_text,
                                 byte_table=self.byte_table)
        return req.detok

    MAX_STOP_PREFIXES = 64   # stop-string tuples whose StopPrefixes (and its verdict per token) are kept

    def stop_prefixes(self, stops: tuple[str, ...]) -> StopPrefixes:
        """The StopPrefixes of `stops` the streams of this engine's requests share, so that its
        verdict per token (`StopPrefixes.quiet`, a byte per token id) is worked out once."""
        got = self._stop_prefixes.get(stops)
        if got is None:
            if len(self._stop_prefixes) >= self.MAX_STOP_PREFIXES:
                self._stop_prefixes.clear()
            got = self._stop_prefixes[stops] = StopPrefixes(stops)
        return got

    def finalize(self, req: Request, o: RequestOutput) -> None:
        """The finished request's text (apar.recover_text, from the text already decoded), branches and stats."""
        o.text = recover_text(self.decode, req.branches, self.control, self.special_ids, join=self.config.text_join,
                              budget=req.budget, segment=self.text_of(req).segment_renderer(req.branches))
        o.branches = branch_schema(req.branches, req.budget)
        o.stats = request_stats(decode_steps=req.decode_steps, forks=len(o.branches) - 1,
                                generated_tokens=req.generated_tokens, peak_kv_blocks=req.peak_kv_blocks,
                                preemptions=req.num_preemptions, accepted_lengths=req.accepted_lengths)

    def run(self, requests: Iterable[tuple[str | None, SamplingParams, dict]]) -> list[RequestOutput]:
        """Serve a batch to completion. A request rejected up front gets an output with `error`
        set and finish_reason 'error'; all others still run."""
        results: dict[str, RequestOutput] = {}
        order: list[str | RequestOutput] = []
        limit = self.config.max_waiting
        for prompt, params, kw in requests:
            while limit and len(self.scheduler.waiting) >= limit:   # keep the queue within its bound
                for o in self.step():
                    if o.finished:
                        results[o.request_id] = o
            try:
                order.append(self.add_request(prompt, params, **kw))
            except ValueError as e:
                order.append(RequestOutput(request_id="", prompt=prompt or "", prompt_ids=[], deltas=[],
                                           finished=True, finish_reason=FinishReason.ERROR, error=str(e)))
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    results[o.request_id] = o
        return [x if isinstance(x, RequestOutput) else results[x] for x in order]
