"""Our Llama's step on CUDA with fused projections and fused elementwise kernels.

`fuse_projections` packs each layer's q/k/v and gate/up weights into one matrix and makes the
original Linear weights views into it, so the plain module (CPU path, export) still works and
no memory is duplicated. `fused_hidden_states` then runs a layer as: add+RMSNorm, one QKV matmul,
RoPE of q and k in place with the new K/V written to the pool (one launch), the Triton
attention kernel, O projection, add+RMSNorm, one gate/up matmul, SiLU*up, down projection:
about 10 launches per layer instead of about 40.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apar_rt.kernels.fused import add_rms_norm, rope_and_cache_, silu_mul
from apar_rt.kernels.tree_attention import tree_paged_attention


def _pack(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears], dim=0)
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(weight[row:row + n], requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias[row:row + n], requires_grad=False)
        row += n
    return weight, bias


@torch.no_grad()
def fuse_projections(model) -> None:
    """Idempotent: give every layer `qkv` and `gate_up` packed (weight, bias) pairs."""
    for layer in model.model.layers:
        if hasattr(layer, "qkv"):
            continue
        a, m = layer.self_attn, layer.mlp
        layer.qkv = _pack([a.q_proj, a.k_proj, a.v_proj])
        layer.gate_up = _pack([m.gate_proj, m.up_proj])


def fused_hidden_states(model, input_ids, positions, k_caches, v_caches, block_tables, context_lens,
                        query_start, mask, slot_mapping=None):
    """Same contract as `LlamaForCausalLM.hidden_states` (final-norm hidden states and per-layer new
    K/V); needs `fuse_projections(model)` first. With `slot_mapping` ([T] flat slots, -1 for none)
    each layer also writes its new K/V to its pools, in the launch that applies RoPE."""
    cfg = model.config
    T = input_ids.shape[0]
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = model.model.embed_tokens(input_ids)
    residual = None
    new_k, new_v = [], []
    max_context = block_tables.shape[1] * k_caches[0].shape[1]
    for layer, kc, vc in zip(model.model.layers, k_caches, v_caches):
        h, residual = add_rms_norm(x, residual, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        qkv = F.linear(h, *layer.qkv).view(T, hq + 2 * hkv, d)
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
        rope_and_cache_(q, k, v, positions, model.inv_freq, kc, vc, slot_mapping)
        o = tree_paged_attention(q, k, v, kc, vc, block_tables, context_lens, query_start, mask,
                                 layer.self_attn.scale, max_context=max_context)
        x = layer.self_attn.o_proj(o.view(T, hq * d))
        h, residual = add_rms_norm(x, residual, layer.post_attention_layernorm.weight,
                                   layer.post_attention_layernorm.variance_epsilon)
        x = layer.mlp.down_proj(silu_mul(F.linear(h, *layer.gate_up)))
        new_k.append(k)
        new_v.append(v)
    h, _ = add_rms_norm(x, residual, model.model.norm.weight, model.model.norm.variance_epsilon)
    return h, new_k, new_v
