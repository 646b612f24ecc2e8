"""`LLM`: the offline batch API (vLLM-style) over the engine."""

from __future__ import annotations

from typing import Sequence

from apar_rt.core import RequestOutput, SamplingParams
from apar_rt.engine import Engine


class LLM:
    """Generate with APAR from a model folder.

    >>> llm = LLM("samples/models/apar-tiny", backend="torch")
    >>> out = llm.generate(["Give me 3 tips."], SamplingParams(max_tokens=64))[0]
    >>> out.text, out.branches, out.stats
    """

    def __init__(self, model: str, backend: str = "torch", *, mode: str = "apar", dtype: str | None = "auto",
                 device: str | None = None, raw: bool = False, **engine_kwargs) -> None:
        self.engine = Engine.from_pretrained(model, backend=backend, dtype=dtype, device=device, mode=mode,
                                             **engine_kwargs)
        self.raw = raw

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order. A prompt that cannot be served gets
        an output whose `error` says why; the others are unaffected."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is not None:
            items = [(None, {"prompt_token_ids": list(ids)}) for ids in prompt_token_ids]
        else:
            items = [(p, {"raw": self.raw}) for p in (prompts or [])]
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(items)
        if len(plist) != len(items):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(items)} prompts")
        return self.engine.run((p, sp, kw) for (p, kw), sp in zip(items, plist))
