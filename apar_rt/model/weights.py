"""Loading HF Llama weights from a local folder, safely (safetensors or weights_only torch.load)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apar_rt.config import ModelConfig, ModelLoadError


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{index} is not a valid shard index: {e}") from None
            root = path.resolve()
            for s in shards:
                if not isinstance(s, str) or not (path / s).resolve().is_relative_to(root):
                    raise ModelLoadError(f"{index} names the shard {str(s)!r}, which is not inside the model "
                                         "folder; a shard index may only name files in its own folder")
            files = [path / s for s in shards]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{index} names shards that are missing: {', '.join(missing)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise ModelLoadError(f"{str(path)!r} holds no weights: expected model.safetensors, a sharded "
                         "model.safetensors.index.json, or pytorch_model.bin")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `path`, by their HF names."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            try:
                state.update(load_file(str(f)))
            except Exception as e:  # safetensors raises its own error types
                raise ModelLoadError(f"cannot read {f}: {e}") from None
        else:
            try:
                part = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ModelLoadError(f"cannot read {f} with torch.load(weights_only=True): {e}") from None
            state.update(part)
    return state


def remap_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one place where checkpoint names become ours (they are HF's, minus rotary buffers)."""
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Build our `LlamaForCausalLM` from a HF folder; raises ModelLoadError on any mismatch."""
    from apar_rt.model.llama import LlamaForCausalLM

    cfg = ModelConfig.from_dir(path)
    state = remap_hf_names(load_state_dict(path))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {k for k in model.state_dict().keys()}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ModelLoadError(f"weights in {str(path)!r} do not match the config: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in model.state_dict().items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ModelLoadError(f"weight {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
    model.load_state_dict({k: t.to(dtype) for k, t in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from apar_rt.model.llama import half_swap, rope_inv_freq
    model.inv_freq = rope_inv_freq(cfg)   # buffers built on the meta device
    model.rope_swap = half_swap(cfg.head_dim)
    return model.to(device).eval(), cfg
