"""The engine loop: schedule -> backend.forward -> sample -> scheduler.update, with streaming output."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

from apar_rt.apar import ControlTokens, branch_schema, recover_text
from apar_rt.backends import Backend, backend_class
from apar_rt.config import EngineConfig, ModelConfig
from apar_rt.core import Request, RequestOutput, SamplingParams
from apar_rt.model.tokenizer import control_tokens, encode_prompt, load_tokenizer
from apar_rt.sampler import Sampler, SampleRow, make_generator
from apar_rt.scheduler import RequestRejected, Scheduler, StepUpdate


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
        self.config = replace(config, max_model_len=max_len)
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | frozenset(self.control.ids)
        self.scheduler = Scheduler(self.config, self.control, max_model_len=max_len, eos_token_ids=sorted(eos),
                                   decode=self.decode, special_ids=self.special_ids)
        self.sampler = Sampler()
        backend.allocate_kv(config.num_blocks, config.block_size)
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, backend: str = "torch", dtype: str | None = "auto",
                        device: str | None = None, **engine_kwargs) -> "Engine":
        """Load a HF model folder (torch backend) or an engine folder (built backends)."""
        cfg = EngineConfig(**engine_kwargs)
        model_config = ModelConfig.from_dir(model_dir)
        tokenizer = load_tokenizer(model_dir)
        be = backend_class(backend)(str(model_dir), dtype=dtype, device=device)
        return cls(be, tokenizer, model_config, cfg)

    # ---- requests ------------------------------------------------------------------------

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

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
                      prompt_token_ids=ids, params=params, generator=make_generator(params.seed))
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
        out = self.scheduler.schedule()
        sampled: list[int] = []
        if out.step is not None:
            logits = self.backend.forward(out.step)
            banned = self.scheduler.sampling_banned(out)
            rows = [SampleRow(s.request.params, ban, s.request.generator)
                    for s, ban in zip((s for s in out.seqs if s.samples), banned)]
            sampled = self.sampler.sample(logits, rows)
            self.num_steps += 1
        updates = self.scheduler.update(out, sampled)
        return [self._output(u) for u in updates]

    def _output(self, upd: StepUpdate) -> RequestOutput:
        req = upd.request
        o = RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                          deltas=upd.deltas, finished=upd.finished, finish_reason=req.finish_reason,
                          error=req.error)
        if upd.finished:
            self._requests.pop(req.request_id, None)
            self.finalize(req, o)
        return o

    def finalize(self, req: Request, o: RequestOutput) -> None:
        o.text = recover_text(self.decode, req.branches, self.control, self.special_ids)
        o.branches = branch_schema(req.branches)
        o.stats = {"decode_steps": req.decode_steps, "forks": req.forks,
                   "generated_tokens": req.generated_tokens, "peak_kv_blocks": req.peak_kv_blocks,
                   "preemptions": req.num_preemptions}

    def run(self, requests: Iterable[tuple[str | None, SamplingParams, dict]]) -> list[RequestOutput]:
        """Serve a batch to completion. A request rejected up front gets an output with `error`
        set and finish_reason 'error'; all others still run."""
        from apar_rt.core import FinishReason

        results: dict[str, RequestOutput] = {}
        order: list[str | RequestOutput] = []
        for prompt, params, kw in requests:
            try:
                order.append(self.add_request(prompt, params, **kw))
            except ValueError as e:
                order.append(RequestOutput(request_id="", prompt=prompt or "", prompt_token_ids=[], deltas=[],
                                           finished=True, finish_reason=FinishReason.ERROR, error=str(e)))
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    results[o.request_id] = o
        return [x if isinstance(x, RequestOutput) else results[x] for x in order]
