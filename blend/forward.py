"""One decoder layer, split where CacheBlend needs to step in: after Q/K/V (to compare and fuse
them with the cache) and before attention (queries of a token subset over the fused cache).

It runs on transformers' own modules and weights (Llama, Mistral, Qwen2's biases, Qwen3's q/k
norms), so one engine serves them all; tests check it against the model's own forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blend.rope import apply_rope, rope_cos_sin


@dataclass
class ModelParts:
    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    inv_freq: torch.Tensor
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


def model_parts(model: torch.nn.Module) -> ModelParts:
    inner = model.model
    attn = inner.layers[0].self_attn
    return ModelParts(
        embed=inner.embed_tokens, layers=inner.layers, norm=inner.norm, lm_head=model.lm_head,
        inv_freq=inner.rotary_emb.inv_freq, n_layers=len(inner.layers),
        n_kv_heads=model.config.num_key_value_heads, head_dim=attn.head_dim,
        dtype=inner.embed_tokens.weight.dtype, device=inner.embed_tokens.weight.device)


def rope_for(parts: ModelParts, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(parts.inv_freq, positions, parts.dtype)


def project_qkv(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [1, T, hidden] → q [1, Hq, T, D], k and v [1, Hkv, T, D], keys rotated to their positions."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend_and_mlp(layer: torch.nn.Module, h: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Queries attend over `keys`/`values` (mask None: plain causal, queries = keys), then the MLP."""
    attn = layer.self_attn
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                         scale=attn.scaling, enable_gqa=q.shape[1] != keys.shape[1])
    h = h + attn.o_proj(out.transpose(1, 2).reshape(*h.shape[:-1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def causal_mask(query_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Boolean [Tq, n_keys]: a query sees every key at a position ≤ its own."""
    return torch.arange(n_keys, device=query_pos.device)[None, :] <= query_pos[:, None]


def logits_of(parts: ModelParts, h_last: torch.Tensor) -> torch.Tensor:
    return parts.lm_head(parts.norm(h_last)).float().reshape(-1)
