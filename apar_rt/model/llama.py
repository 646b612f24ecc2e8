"""A Llama/Vicuna decoder over the packed-step contract of `apar::tree_paged_attention`.

Module and parameter names match Hugging Face's `LlamaForCausalLM`, so a checkpoint's
state dict loads as it is (see weights.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from apar_rt.config import ModelConfig
from apar_rt.ops.tree_attention import tree_paged_attention


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for RoPE, with the checkpoint's rope_theta and rope_scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling_dict
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_len = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [T, 1, D] for `apply_rope`, computed once per step for all layers.

    HF's rotate-half convention: rotate_half(x) * sin == x[..., half_swap] * signed_sin, with
    signed_sin = [-sin, sin] over the two halves (the same products, the sign moved).
    """
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1)[:, None, :].to(dtype), torch.cat([-sin, sin], dim=-1)[:, None, :].to(dtype)


def half_swap(head_dim: int) -> torch.Tensor:
    """Indices that swap the two halves of the head dimension (rotate-half without the sign)."""
    half = head_dim // 2
    return torch.cat([torch.arange(half, head_dim), torch.arange(half)])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, signed_sin: [T, 1, D] from `rope_tables`; swap from `half_swap`.

    One gather, two products and a sum (4 ONNX nodes where slicing, negating and concatenating
    took 7 per tensor)."""
    return x * cos + x.index_select(-1, swap) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, rope, k_cache, v_cache, block_tables, context_lens, query_start, mask):
        # -1 for the token axis: the exported graph then reshapes with constant shapes
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = tree_paged_attention(q, k, v, k_cache, v_cache, block_tables, context_lens,
                                 query_start, mask, self.scale)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, k_cache, v_cache, block_tables, context_lens, query_start, mask):
        h, k, v = self.self_attn(self.input_layernorm(x), rope, k_cache, v_cache,
                                 block_tables, context_lens, query_start, mask)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """One packed step: new tokens in, logits at `logits_indices` and the new K/V out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.register_buffer("rope_swap", half_swap(cfg.head_dim), persistent=False)

    def hidden_states(self, input_ids, positions, k_caches, v_caches, block_tables, context_lens,
                      query_start, mask):
        """Final-norm hidden states [T, hidden] and the per-layer new K and V ([T, Hkv, D] each)."""
        x = self.model.embed_tokens(input_ids)
        rope = (*rope_tables(positions, self.inv_freq, x.dtype), self.rope_swap)
        new_k, new_v = [], []
        for layer, kc, vc in zip(self.model.layers, k_caches, v_caches):
            x, k, v = layer(x, rope, kc, vc, block_tables, context_lens, query_start, mask)
            new_k.append(k)
            new_v.append(v)
        return self.model.norm(x), new_k, new_v

    def forward(self, input_ids, positions, k_caches, v_caches, block_tables, context_lens,
                query_start, mask, logits_indices):
        """Returns (logits [N, vocab] in float32, new_k list, new_v list)."""
        h, new_k, new_v = self.hidden_states(input_ids, positions, k_caches, v_caches, block_tables,
                                             context_lens, query_start, mask)
        logits = self.lm_head(h[logits_indices.long()]).float()
        return logits, new_k, new_v
