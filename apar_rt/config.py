"""Frozen configuration: the model's shape (read from a HF config.json) and the engine's budgets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelLoadError(ValueError):
    """A folder or file that is not a model apar-rt can load; the message says why."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The decoder's shape, as in HF `LlamaConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float | str], ...] = ()  # sorted items of the HF dict, minus theta
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        model_type = d.get("model_type", "llama")
        if model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ModelLoadError(
                f"unsupported architecture {archs} (model_type={model_type!r}); "
                f"apar-rt supports {', '.join(SUPPORTED_ARCHITECTURES)} (Llama, Vicuna)")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu' is supported")
        rope = dict(d.get("rope_parameters") or {})
        if d.get("rope_scaling"):
            rope.update(d["rope_scaling"])
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        rope.pop("type", None)
        rope["rope_type"] = rope_type
        heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted(rope.items())),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"model folder {str(path)!r} does not exist")
        if not path.is_dir():
            raise ModelLoadError(f"model path {str(path)!r} is not a folder")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
        try:
            d = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d)
        except KeyError as e:
            raise ModelLoadError(f"{cfg} lacks the field {e.args[0]!r}") from None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Budgets of the KV cache and the in-flight batching loop."""

    num_blocks: int = 512          # KV blocks in the pool, the null block included
    block_size: int = 16           # tokens per KV block
    max_num_seqs: int = 64         # most sequences (APAR branches count one each) in a step
    max_num_tokens: int = 2048     # most new tokens in a packed step (prefill chunks + decodes)
    # most prompt tokens of one sequence in a step (vLLM's long_prefill_token_threshold); 0: no cap
    # but max_num_tokens; None: the backend's `preferred_prefill_chunk` (the engine resolves it)
    long_prefill_token_threshold: int | None = None
    watermark: float = 0.01        # fraction of blocks kept free when admitting new requests
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    mode: str = "apar"             # "apar" forks on [Fork]; "ar" bans both control tokens
    max_depth: int = 2             # [Fork] is banned in branches at this depth or deeper
    ban_fork_when_full: bool = False  # ban [Fork] while the step already holds max_num_seqs
    medusa_tree: str | None = None  # Medusa draft tree (preset name or JSON file); None: no drafts
    acceptance: str = "typical"    # how sampled requests accept drafts: "typical" or "greedy" (none)
    # no draft trees in a step after one that ran at least this many sequences (vLLM's
    # speculative_disable_by_batch_size; APAR branches count one each); None: no such limit
    speculative_disable_by_batch_size: int | None = None
    text_join: str = "inplace"     # text recovery: "inplace", or "reference" (THUDM/APAR's newline fix-ups)
    max_waiting: int = 1024        # most requests waiting for admission; past it a new one is refused (0: no limit)

    def __post_init__(self) -> None:
        if self.mode not in ("apar", "ar"):
            raise ValueError(f"mode must be 'apar' or 'ar', got {self.mode!r}")
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the reserved null block), got {self.num_blocks}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.acceptance not in ("greedy", "typical"):
            raise ValueError(f"acceptance must be 'greedy' or 'typical', got {self.acceptance!r}")
        if self.text_join not in ("inplace", "reference"):
            raise ValueError(f"text_join must be 'inplace' or 'reference', got {self.text_join!r}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0 (0: no cap), "
                             f"got {self.long_prefill_token_threshold}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 (0: no limit), got {self.max_waiting}")
        if self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        if self.speculative_disable_by_batch_size is not None and self.speculative_disable_by_batch_size < 1:
            raise ValueError(f"speculative_disable_by_batch_size must be >= 1 (None: no limit), "
                             f"got {self.speculative_disable_by_batch_size}")
