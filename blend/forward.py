"""One decoder layer, split where CacheBlend needs to step in: after Q/K/V (to compare and fuse
them with the cache) and before attention (queries of a token subset over the fused cache).

It runs on transformers' own modules and weights (Llama, Mistral, Qwen2's biases, Qwen3's q/k
norms), so one engine serves them all; tests check it against the model's own forward. The
elementwise steps (RMSNorm, residual add, RoPE, SiLU·up) are written out so that on CUDA each is
one compiled kernel instead of several eager ones: in the few-token layers they cost as much as
the matmuls otherwise.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from blend.rope import rope_cos_sin, rotate_half


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
    # the chunks' re-rotation tables by layout (blend/prefill.py chunk_rotation), a few kept
    rotations: dict = field(default_factory=dict, repr=False)


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


# -- elementwise steps, in transformers' exact order of operations -------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + delta
    return h, _rms_norm(h, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_EAGER = {"rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rope": apply_rope, "silu_mul": _silu_mul}
_COMPILED: dict[str, Callable] = {}
# Read once, at import: op() runs several times per layer, and the knob is a per-process choice.
COMPILE = os.environ.get("RAGBLEND_COMPILE", "1") != "0"


def op(name: str, x: torch.Tensor) -> Callable:
    """The compiled kernel on CUDA (RAGBLEND_COMPILE=0 in the environment of the process turns
    it off), the eager one elsewhere."""
    if x.device.type != "cuda" or not COMPILE:
        return _EAGER[name]
    if name not in _COMPILED:
        try:
            _COMPILED[name] = torch.compile(_EAGER[name], dynamic=True)
        except Exception:  # no compiler toolchain: eager is correct, only slower
            _COMPILED[name] = _EAGER[name]
    return _COMPILED[name]


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(module, "variance_epsilon"):
        return op("rms_norm", x)(x, module.weight, module.variance_epsilon)
    return module(x)


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(mlp, "gate_proj") and getattr(mlp, "act_fn", None).__class__.__name__ in ("SiLU", "SiLUActivation"):
        return mlp.down_proj(op("silu_mul", x)(mlp.gate_proj(x), mlp.up_proj(x)))
    return mlp(x)


def project_qkv(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [1, T, hidden] → q [1, Hq, T, D], k and v [1, Hkv, T, D], keys rotated to their positions."""
    attn = layer.self_attn
    x = _norm(layer.input_layernorm, h)
    shape = (*x.shape[:-1], -1, head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before RoPE
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rope = op("rope", q)
    return rope(q, cos, sin), rope(k, cos, sin), v


def project_q(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              head_dim: int) -> torch.Tensor:
    """Queries alone, h [1, T, hidden] → [1, Hq, T, D] rotated to their positions: project_qkv's
    q for a few tokens that only look (a probe). Eager elementwise steps: for a handful of tokens
    a compiled region's guards cost more host time than the kernels it fuses."""
    attn = layer.self_attn
    norm = layer.input_layernorm
    x = _rms_norm(h, norm.weight, norm.variance_epsilon) if hasattr(norm, "variance_epsilon") else norm(h)
    q = attn.q_proj(x).view(*x.shape[:-1], -1, head_dim)
    if hasattr(attn, "q_norm"):
        qn = attn.q_norm
        q = _rms_norm(q, qn.weight, qn.variance_epsilon) if hasattr(qn, "variance_epsilon") else qn(q)
    return apply_rope(q.transpose(1, 2), cos, sin)


def attend_and_mlp(layer: torch.nn.Module, h: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Queries attend over `keys`/`values`, then the MLP. `mask` None: the queries are the last
    ones of the keys' positions (plain causal when they are all of them)."""
    attn = layer.self_attn
    n_q, n_k = q.shape[2], keys.shape[2]
    if mask is None and n_q < n_k:
        # A tail of queries: padding them to the front with zero queries lets the plain causal
        # kernel run (bottom-right aligned), which beats any explicit mask while the tail is long.
        q = torch.cat([q.new_zeros(*q.shape[:2], n_k - n_q, q.shape[3]), q], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                         scale=attn.scaling, enable_gqa=q.shape[1] != keys.shape[1])
    out = out[:, :, out.shape[2] - n_q:]
    delta = attn.o_proj(out.transpose(1, 2).reshape(*h.shape[:-1], -1))
    post = layer.post_attention_layernorm
    if hasattr(post, "variance_epsilon"):
        h, x = op("add_rms_norm", h)(h, delta, post.weight, post.variance_epsilon)
    else:
        h = h + delta
        x = post(h)
    return h + _mlp(layer.mlp, x)


def causal_mask(query_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Boolean [Tq, n_keys]: a query sees every key at a position ≤ its own."""
    return torch.arange(n_keys, device=query_pos.device)[None, :] <= query_pos[:, None]


def logits_of(parts: ModelParts, h_last: torch.Tensor) -> torch.Tensor:
    return parts.lm_head(parts.norm(h_last)).float().reshape(-1)
