"""The `question` selection (InfoFlow-KV): the question reads the stale context first, and the
chunk tokens it reads most are the ones blend recomputes.

The question's tokens run through every layer over the chunks' cached, re-rotated KV — exactly
the prefill `reuse` makes — and at the last `n_scored` layers the question's attention
probabilities A_l[h, q, k] score each chunk token k:

    s_k = sqrt( Σ_l Σ_q (mean_h A_l[h, q, k])² )

(InfoFlow-KV's score, summed over the scored layers inside the root). Unlike the check layer's own
attention (which sees the chunks through two layers) or the lookahead probe (the check layer's
hidden states projected into the next few layers), this is the attention the question really
pays where the answer is formed, at the price of one extra `reuse` pass over the suffix.

On CUDA the unscored layers replay the same graphs `reuse` replays; the scored ones run eagerly,
since they must return the attention probabilities that the fused kernel never materializes.
"""
from __future__ import annotations

import torch

from blend.forward import ModelParts, attend_and_mlp, causal_mask, project_qkv, rope_for
from blend.graphs import LayerGraphs

# InfoFlow-KV scores at the last two layers.
DEFAULT_SCORED_LAYERS = 2


def scored_layers(n_layers: int, n_scored: int = DEFAULT_SCORED_LAYERS) -> range:
    return range(max(0, n_layers - n_scored), n_layers)


def attention_score(q: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, scale: float,
                    lo: int, hi: int) -> torch.Tensor:
    """[hi - lo] float32: Σ_q (mean_h A[h, q, k])² for key positions k in lo…hi-1, where A is the
    causal softmax of queries `q` [Hq, Tq, D] at positions `q_pos` over `keys` [Hkv, N, D]
    (positions 0…N-1)."""
    q, keys = q.float(), keys.float()
    (hq, tq, d), (hkv, n) = q.shape, keys.shape[:2]
    g = hq // hkv
    # GQA without repeating K: the query heads of one KV head stack into one batch row.
    scores = torch.baddbmm(keys.new_zeros(()), q.reshape(hkv, g * tq, d), keys.transpose(1, 2),
                           beta=0.0, alpha=scale).view(hkv, g, tq, n)
    hidden = torch.arange(n, device=q.device)[None, :] > q_pos[:, None]   # [Tq, N]
    scores.masked_fill_(hidden, float("-inf"))
    mean = scores.softmax(dim=-1).mean(dim=(0, 1))                         # [Tq, N]
    return mean[:, lo:hi].square().sum(dim=0)


def question_pass(parts: ModelParts, ids: torch.Tensor, kv: torch.Tensor, start: int, lo: int, hi: int,
                  n_scored: int = DEFAULT_SCORED_LAYERS, graphs: LayerGraphs | None = None,
                  feed=None) -> torch.Tensor:
    """Run the tokens at positions `start…N-1` (the question) through every layer over the fused
    cache `kv` [L, 2, H, N, D] (stale chunk KV in place, re-rotated; the tokens' own K/V are
    written into it) and return each chunk token's score (positions lo…hi-1), float32 [hi - lo].
    With `graphs`, the unscored layers replay CUDA graphs; with `feed` (a LayerFeed), each layer's
    cache is filled as its KV arrives: in the graphs, which rotate the keys themselves, and rotated
    on the side stream before an eager layer. Nothing here waits for the GPU."""
    n = kv.shape[3]
    active = torch.arange(start, n, device=parts.device)
    h = parts.embed(ids[start:])[None]
    cos, sin = rope_for(parts, active)
    mask = causal_mask(active, n)
    scored = scored_layers(parts.n_layers, n_scored)
    total = torch.zeros(hi - lo, dtype=torch.float32, device=parts.device)
    first = 0
    if graphs is not None and scored.start > 0 and graphs.covers(active.numel()):
        if feed is None:
            h = graphs.run(0, h, active, n, last=scored.start)
        else:
            h = graphs.run(0, h, active, n, feed.fill, feed.graph_rotation(), last=scored.start)
        first = scored.start
    for i in range(first, parts.n_layers):
        layer = parts.layers[i]
        if feed is not None:
            feed.arriving.start(i)
            feed(i)
        q, k, v = project_qkv(layer, h, cos, sin, parts.head_dim)
        kv[i, 0].index_copy_(1, active, k[0])
        kv[i, 1].index_copy_(1, active, v[0])
        if i in scored:
            total += attention_score(q[0], kv[i, 0], active, layer.self_attn.scaling, lo, hi)
        if i + 1 < parts.n_layers:  # the last layer's output is never read
            h = attend_and_mlp(layer, h, q, kv[i, 0][None], kv[i, 1][None], mask)
    return total.sqrt()
