"""Where the question will look: its attention over the chunks at the layers after the check layer,
estimated before they run.

At the check layer every token is still exact, so the question's hidden states after it are the
ones a full prefill has. Projected through the next layers' query weights (as if the residual
stream did not move further), they attend over those layers' *cached* keys, which the blend
cache already holds. The attention mass a chunk token gets there says how much of its stale KV the
question will read: measured on SmolLM2 (README, "Token selection"), this beats the question's
attention at the check layer itself, which sees the chunks through only two layers.

Cost: one query projection and one attention per probed layer, for the question's tokens only.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from blend.forward import ModelParts, apply_rope, attend_and_mlp, causal_mask, project_q

# How many layers after the check layer are probed. Measured on SmolLM2 (12 pyref + 12 synthetic
# examples, r = 0.15): 4 layers gave 0.29×/0.16× reuse's KL, 8 layers 0.27×/0.16×, every 4th
# layer to the top 0.32×/0.19×; the first few layers carry the signal and arrive first when KV
# streams from LMDB.
DEPTH = 4

KeysAt = Callable[[range], torch.Tensor]  # layers → their keys [n, H_kv, S, D] over prefix + chunks, at their places


def probe_layers(n_layers: int, check_layer: int, depth: int = DEPTH) -> range:
    return range(check_layer + 1, min(n_layers, check_layer + 1 + depth))


def question_states(layer: torch.nn.Module, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_start: int, index: torch.Tensor) -> torch.Tensor:
    """The question's hidden states after the check layer: its queries (active indices q_start…)
    over the layer's fresh K/V of every active token (`index`: each one's key index), then the
    MLP. [1, Tq, hidden]."""
    mask = causal_mask(index[q_start:], k.shape[2])
    return attend_and_mlp(layer, h[:, q_start:], q[:, :, q_start:], k, v, mask)


def probe_queries(parts: ModelParts, layers: range, hq: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """[n, Hq, Tq, D]: each probed layer's rotated queries of the same hidden states `hq`, as
    project_q gives them, bit for bit. The input RMSNorm's statistics are those of `hq` for every
    layer, so they are taken once and only the layers' weights differ, and the rotation runs once
    over all layers: a third of the launches (the probe is host-bound). A model with per-head
    query norms (Qwen3) or norms of another kind projects layer by layer."""
    mods = [parts.layers[i] for i in layers]
    norms = [m.input_layernorm for m in mods]
    eps = {getattr(nm, "variance_epsilon", None) for nm in norms}
    if None in eps or len(eps) > 1 or any(hasattr(m.self_attn, "q_norm") for m in mods):
        return torch.stack([project_q(m, hq, cos, sin, parts.head_dim)[0] for m in mods])
    x32 = hq.float()
    unit = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps.pop())).to(hq.dtype)  # [1, Tq, hidden]
    q = torch.stack([m.self_attn.q_proj(nm.weight * unit)[0] for m, nm in zip(mods, norms)])  # [n, Tq, Hq·D]
    return apply_rope(q.view(len(mods), q.shape[1], -1, parts.head_dim).transpose(1, 2), cos, sin)


def lookahead_attention(parts: ModelParts, hq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        layers: range, keys_at: KeysAt, lo: int, hi: int) -> torch.Tensor:
    """[hi - lo] float32: attention mass the question's queries (hidden states `hq` rotated by
    cos/sin of their positions) put on key positions lo…hi-1, summed over heads, question tokens
    and the probed `layers`; each layer's softmax runs over the keys `keys_at` gives.

    Only the queries are projected (the probe never reads its own K and V), and the scores stay
    in the model's dtype with the softmax accumulated in float32: the probe ranks tokens, and a
    bf16 score is far finer than the gaps that decide the ranking."""
    if not len(layers):
        return hq.new_zeros(hi - lo, dtype=torch.float32)
    # The probed layers' attention in one batch: their queries and keys stacked, one bmm, one
    # softmax and one sum instead of a handful of launches per layer (the probe runs from the
    # host thread that queues the prefill, so launches are its cost).
    qs = probe_queries(parts, layers, hq, cos, sin)  # [n, Hq, Tq, D]
    ks = keys_at(layers)                             # [n, Hkv, S, D]
    (n, hq_, tq, d), hkv = qs.shape, ks.shape[1]
    # GQA without repeating K: the query heads of one KV head stack into one batch row.
    q = qs.reshape(n * hkv, (hq_ // hkv) * tq, d)
    k = ks.reshape(n * hkv, -1, d)
    scores = torch.bmm(q, k.transpose(1, 2))
    probs = torch.softmax(scores.mul_(parts.layers[layers[0]].self_attn.scaling), dim=-1, dtype=torch.float32)
    return probs[..., lo:hi].sum(dim=(0, 1))
