"""`apar-rt bench widen`: a larger Llama checkpoint that computes exactly what a smaller one does.

For benchmarks at a realistic model size with a model that really forks: the bundled demo
(hidden 128, 4 layers) is small enough that per-step overheads, not the forward, set its speed,
and training an APAR model of realistic size is out of reach here. The widened checkpoint is a
dense model of the new size, so its forward costs what one of that size costs, and its logits
are the source's, so its greedy trees and texts are too.

With f = new hidden size / old (an integer):

- every dimension that scales with the width grows f times: the hidden size, the query and KV
  heads (head_dim is kept, so query head h still reads KV head h // (Hq / Hkv)) and the MLP's
  intermediate size; each matrix holds the source's weights in its leading block;
- the residual stream's new dimensions stay 0: every matrix that writes into it (the
  embeddings, o_proj, down_proj) has zero rows there, and the new heads' and MLP units' columns
  of o_proj and down_proj are zero, so what they compute never reaches it;
- everything else that is new (the new heads' q, k, v rows, the new units' gate and up rows,
  lm_head's new columns, which meet only zeros) is random, so no kernel sees a structured zero
  block where a real model has weights;
- an RMSNorm over f times the dimensions, f - 1 of f of them zero, sees the mean square divided
  by f: its weight is multiplied by 1 / sqrt(f) and eps divided by f, so its output on the source's
  dimensions is unchanged (bit for bit when f is a power of 4: every factor is a power of 2);
- layers beyond the source's are identities: random q, k, v, gate and up, zero o_proj and down_proj.

Medusa heads (`medusa/`, `apar_rt.medusa.heads`) are widened the same way: each ResBlock's
new rows (weight and bias) are zero, so x + SiLU(Wx + b) keeps the new dimensions at 0, its new
columns random; each projection gets random new columns. Their logits are the source heads'.

The source must be a Llama without biases; its weights are read with `apar_rt.model.weights`
(safetensors, or weights_only torch.load) and written as one model.safetensors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from apar_rt.config import ModelConfig, ModelLoadError

# the source's files that still describe the widened model (the tokenizer's, generation settings)
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja",
                 "chat_template.json")


def widened_config(hf: dict, hidden_size: int, num_layers: int) -> dict:
    """The HF config dict of `hf`'s model widened to `hidden_size` and deepened to `num_layers`."""
    cfg = ModelConfig.from_hf_dict(hf)
    if cfg.attention_bias or cfg.mlp_bias:
        raise ValueError("only a Llama without attention or MLP biases can be widened "
                         f"(attention_bias={cfg.attention_bias}, mlp_bias={cfg.mlp_bias})")
    if hidden_size < cfg.hidden_size or hidden_size % cfg.hidden_size:
        raise ValueError(f"--hidden-size {hidden_size} must be a multiple of the model's hidden size "
                         f"{cfg.hidden_size} (e.g. {4 * cfg.hidden_size})")
    if num_layers < cfg.num_hidden_layers:
        raise ValueError(f"--num-layers {num_layers} must be at least the model's {cfg.num_hidden_layers} layers")
    f = hidden_size // cfg.hidden_size
    out = dict(hf)
    out.update(hidden_size=hidden_size, intermediate_size=cfg.intermediate_size * f,
               num_attention_heads=cfg.num_attention_heads * f, num_key_value_heads=cfg.num_key_value_heads * f,
               head_dim=cfg.head_dim, num_hidden_layers=num_layers, rms_norm_eps=cfg.rms_norm_eps / f)
    return out


def widen_state_dict(state: dict, cfg: ModelConfig, hidden_size: int, num_layers: int, seed: int = 0,
                     std: float = 0.02, progress: bool = False) -> dict:
    """The widened tensors (HF names) of the checkpoint `state` of model `cfg` (see the module);
    `progress`: a bar over the source's tensors and the new layers."""
    import torch
    from tqdm import tqdm

    H, D = cfg.hidden_size, cfg.head_dim
    f = hidden_size // H
    H2, I2 = hidden_size, cfg.intermediate_size * f
    q_rows, kv_rows = cfg.num_attention_heads * f * D, cfg.num_key_value_heads * f * D
    gen = torch.Generator().manual_seed(seed)

    def block(w, rows: int, cols: int, rest: str):
        """w in the leading block of a [rows, cols] matrix whose other entries are `rest`."""
        if rest == "random":
            big = (torch.randn(rows, cols, generator=gen) * std).to(w.dtype)
        else:
            big = torch.zeros(rows, cols, dtype=w.dtype)
        big[:w.shape[0], :w.shape[1]] = w
        return big

    def norm(w):
        return torch.cat([w / math.sqrt(f), torch.ones(H2 - H, dtype=w.dtype)])

    out = {}
    with tqdm(total=len(state) + num_layers - cfg.num_hidden_layers, desc="widen", unit="tensor",
              disable=not progress, dynamic_ncols=True) as bar:
        for name, w in state.items():
            bar.update()
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name.endswith("embed_tokens.weight"):
                out[name] = block(w, w.shape[0], H2, "zeros")   # the new dimensions of the stream start at 0
            elif name == "lm_head.weight":
                out[name] = block(w, w.shape[0], H2, "random")  # new columns meet zeros
            elif name.endswith("norm.weight"):
                out[name] = norm(w)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                "up_proj.weight")):
                out[name] = block(w, w.shape[0] * f, H2, "random")
            elif name.endswith("o_proj.weight"):
                out[name] = block(w, H2, q_rows, "zeros")
            elif name.endswith("down_proj.weight"):
                out[name] = block(w, H2, I2, "zeros")
            else:
                raise ValueError(f"cannot widen the tensor {name!r}: not a Llama weight")
        dtype = next(iter(state.values())).dtype
        for layer in range(cfg.num_hidden_layers, num_layers):   # identities: nothing reaches the stream
            bar.update()
            p = f"model.layers.{layer}."
            for name, rows in (("self_attn.q_proj", q_rows), ("self_attn.k_proj", kv_rows),
                               ("self_attn.v_proj", kv_rows), ("mlp.gate_proj", I2), ("mlp.up_proj", I2)):
                out[p + name + ".weight"] = (torch.randn(rows, H2, generator=gen) * std).to(dtype)
            out[p + "self_attn.o_proj.weight"] = torch.zeros(H2, q_rows, dtype=dtype)
            out[p + "mlp.down_proj.weight"] = torch.zeros(H2, I2, dtype=dtype)
            out[p + "input_layernorm.weight"] = torch.ones(H2, dtype=dtype)
            out[p + "post_attention_layernorm.weight"] = torch.ones(H2, dtype=dtype)
    return out


def widen_medusa_state_dict(state: dict, hidden: int, hidden_size: int, seed: int = 0, std: float = 0.02) -> dict:
    """Medusa heads' tensors (`{head}.{layer}.linear.weight|bias`, `{head}.{num_layers}.weight`)
    widened from `hidden` to `hidden_size` (see the module)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in state.items():
        if name.endswith("linear.bias"):
            out[name] = torch.cat([w, torch.zeros(hidden_size - hidden, dtype=w.dtype)])
            continue
        if not name.endswith(".weight") or w.dim() != 2 or w.shape[1] != hidden:
            raise ValueError(f"cannot widen the Medusa tensor {name!r} of shape {tuple(w.shape)}")
        rows = hidden_size if name.endswith("linear.weight") else w.shape[0]
        big = (torch.randn(rows, hidden_size, generator=gen) * std).to(w.dtype)
        big[w.shape[0]:] = 0   # a ResBlock's new rows: nothing reaches the new dimensions
        big[:w.shape[0], :hidden] = w
        out[name] = big
    return out


def _widen_medusa(src: Path, dst: Path, hidden: int, hidden_size: int, seed: int) -> None:
    """The Medusa folder src, widened into dst (its config, and the weights as safetensors)."""
    from safetensors.torch import save_file

    from apar_rt.medusa.heads import WEIGHTS_SAFE, read_heads_state

    state = widen_medusa_state_dict(read_heads_state(src), hidden, hidden_size, seed)
    dst.mkdir()
    shutil.copy2(src / "config.json", dst / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / WEIGHTS_SAFE))


def widen_checkpoint(model: str | Path, output: str | Path, hidden_size: int, num_layers: int | None = None,
                     seed: int = 0, progress: bool = False) -> dict:
    """Write the widened checkpoint of the HF folder `model` into `output` (new, or an empty folder):
    config.json, model.safetensors, the source's CARRIED_FILES (tokenizer, generation config) and its
    Medusa heads, widened; returns a summary (sizes, parameters, what was carried over and what was
    left out: a model card, say)."""
    from safetensors.torch import save_file

    from apar_rt.medusa.folder import HEADS_DIRNAME, find_heads_dir
    from apar_rt.model.weights import load_state_dict

    src, dst = Path(model), Path(output)
    cfg = ModelConfig.from_dir(src)
    hf = json.loads((src / "config.json").read_text())
    num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
    new_hf = widened_config(hf, hidden_size, num_layers)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"--output {str(dst)!r} exists and is not an empty folder")
    state = load_state_dict(src)
    if not state:
        raise ModelLoadError(f"{str(src)!r} holds no tensors")
    tensors = widen_state_dict(state, cfg, hidden_size, num_layers, seed,
                               std=float(hf.get("initializer_range", 0.02)), progress=progress)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(new_hf, indent=2) + "\n")
    copied, left_out = [], []
    heads = find_heads_dir(src)
    if heads is not None:
        _widen_medusa(heads, dst / HEADS_DIRNAME, cfg.hidden_size, hidden_size, seed)
        copied.append(HEADS_DIRNAME)
    written = {"config.json"} | ({HEADS_DIRNAME} if heads is not None else set())
    for p in sorted(src.iterdir()):
        if p.name in written or p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"):
            continue   # written above, or weights
        if p.is_file() and p.name in CARRIED_FILES:
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
        else:
            left_out.append(p.name)   # a model card, evaluation results
    return {"hidden_size": hidden_size, "num_layers": num_layers, "factor": hidden_size // cfg.hidden_size,
            "parameters": sum(t.numel() for t in tensors.values()), "copied": copied, "left_out": left_out}
