"""The four prefill modes over one prompt layout. Each returns the last position's logits and the
per-layer KV cache that decoding continues from.

| mode   | computed through every layer                    | KV taken from cache          |
| full   | every token (transformers' own forward)          | nothing                      |
| prefix | chunks 2…k and the suffix                        | prefix, chunk 1 (exact)      |
| reuse  | the suffix                                       | prefix, all chunks           |
| blend  | layers ≤ c: all; after c: top-r chunk + suffix   | prefix, the unselected rest  |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from blend.graphs import LayerGraphs
from blend.forward import ModelParts, attend_and_mlp, causal_mask, logits_of, project_qkv, rope_for
from blend.kv import ChunkKV
from blend.prompt import Layout
from blend.rope import delta_cos_sin, rotate_keys_
from blend.select import deviation, select_tokens

MODES = ("full", "prefix", "reuse", "blend")
DEVIATIONS = ("value", "key", "both")


@dataclass(frozen=True)
class BlendConfig:
    ratio: float = 0.15
    check_layer: int = 1
    deviation: str = "value"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.check_layer < 0:
            raise ValueError("check_layer must be ≥ 0")
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")


@dataclass
class PrefillResult:
    logits: torch.Tensor      # [vocab], float32, at the last prompt position
    kv: torch.Tensor          # [L, 2, H, N, D], the decode cache
    n_tokens: int
    recomputed_tokens: int    # chunk tokens whose KV is freshly computed in the last layer


def run_layers(parts: ModelParts, ids: torch.Tensor, kv: torch.Tensor, active: torch.Tensor,
               blend: BlendConfig | None = None, chunk_span: tuple[int, int] | None = None,
               graphs: LayerGraphs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Push the tokens at positions `active` through every layer, writing their K/V into the fused
    cache `kv` [L, 2, H, N, D] (pre-filled with cached K/V elsewhere) and attending over it.

    With `blend`, at the check layer the chunk tokens (positions in `chunk_span`) are ranked by the
    deviation of their fresh K/V from the cached one and only the top ratio, plus every token after
    the chunks, flow on. With `graphs` (whose buffer `kv` must be), the layers where few tokens
    flow replay CUDA graphs instead. Returns the last active token's hidden state and the final
    active set.
    """
    n = kv.shape[3]
    h = parts.embed(ids[active])[None]
    cos, sin = rope_for(parts, active)
    mask = causal_mask(active, n)
    graph_from = blend.check_layer + 1 if blend is not None else 0
    for i, layer in enumerate(parts.layers):
        if graphs is not None and i >= graph_from and graphs.covers(active.numel()):
            with record_function("rb.graph_layers"):
                h = graphs.run(i, h, active, n)
            break
        q, k, v = project_qkv(layer, h, cos, sin, parts.head_dim)
        keep = None
        if blend is not None and i == blend.check_layer:
            with record_function("rb.select"):
                keep = _keep_after_check(active, k, v, kv[i], blend, chunk_span)
        kv[i, 0].index_copy_(1, active, k[0])
        kv[i, 1].index_copy_(1, active, v[0])
        h = attend_and_mlp(layer, h, q, kv[i, 0][None], kv[i, 1][None], mask)
        if keep is not None:
            h, active = h[:, keep], active[keep]
            cos, sin, mask = cos[keep], sin[keep], mask[keep]
    return h[:, -1], active


def _keep_after_check(active: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: torch.Tensor,
                      cfg: BlendConfig, chunk_span: tuple[int, int]) -> torch.Tensor:
    """Indices into `active` that survive the check layer: top-deviation chunk tokens + the suffix."""
    lo, hi = chunk_span
    in_chunks = (active >= lo) & (active < hi)
    idx = in_chunks.nonzero().squeeze(1)
    pos = active[idx]
    dev = torch.zeros(idx.numel(), device=active.device)
    if cfg.deviation in ("value", "both"):
        dev += deviation(v[:, :, idx], cached[1][None, :, pos])
    if cfg.deviation in ("key", "both"):
        dev += deviation(k[:, :, idx], cached[0][None, :, pos])
    chosen = idx[select_tokens(dev, cfg.ratio)]
    rest = (~in_chunks).nonzero().squeeze(1)
    return torch.cat([chosen, rest]).sort().values


def fill_cache(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor,
               chunk_kvs: list[ChunkKV], out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused cache before any compute: exact prefix KV, the given chunks' KV (the first ones of
    the layout, possibly none) re-rotated to their places; the rest is written by compute.

    Chunk KV is copied straight into place (asynchronously from pinned memory), then all moved
    keys are re-rotated in one pass with per-token angles."""
    n_layers, _, heads, _, dim = prefix_kv.shape
    kv = out if out is not None else torch.empty(n_layers, 2, heads, layout.n_tokens, dim,
                                                 dtype=parts.dtype, device=parts.device)
    P = layout.n_prefix
    kv[:, :, :, :P] = prefix_kv
    deltas, end = [], P
    for start, ckv in zip(layout.chunk_starts, chunk_kvs):
        end = start + ckv.n_tokens
        kv[:, :, :, start:end].copy_(ckv.kv, non_blocking=True)
        deltas.append(torch.full((ckv.n_tokens,), start - ckv.start, dtype=torch.long))
    if deltas:
        shift = torch.cat(deltas)
        if shift.any():
            cos, sin = delta_cos_sin(parts.inv_freq, shift.to(parts.device))
            rotate_keys_(kv[:, 0, :, P:end], cos, sin)
    return kv


@torch.inference_mode()
def prefill_full(model: torch.nn.Module, layout: Layout) -> PrefillResult:
    """The baseline: transformers' own forward over the whole prompt."""
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor([layout.ids()], device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return PrefillResult(out.logits[0, -1].float(), kv, layout.n_tokens, layout.n_chunk_tokens)


@torch.inference_mode()
def prefill_cached(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor,
                   chunk_kvs: list[ChunkKV], mode: str, blend: BlendConfig | None = None,
                   graphs: LayerGraphs | None = None) -> PrefillResult:
    """`prefix`, `reuse` or `blend` over cached chunk KVs (one per chunk; `prefix` reads the first)."""
    needed = min(1, len(layout.chunks)) if mode == "prefix" else len(layout.chunks)
    if len(chunk_kvs) < needed:
        raise ValueError(f"{len(chunk_kvs)} chunk KVs for {needed} chunks")
    for ids, ckv in zip(layout.chunks, chunk_kvs):
        if ckv.n_tokens != len(ids):
            raise ValueError(f"chunk KV holds {ckv.n_tokens} tokens, the chunk has {len(ids)}")
    P, S, N = layout.n_prefix, layout.suffix_start, layout.n_tokens
    out = graphs.buffer(N) if graphs is not None else None
    with record_function("rb.fill_cache"):
        kv, start, cfg = _fused_cache(parts, layout, prefix_kv, chunk_kvs, mode, blend, out)
    ids = torch.tensor(layout.ids(), device=parts.device)
    active = torch.arange(start, N, device=parts.device)
    h, final = run_layers(parts, ids, kv, active, cfg, (P, S), graphs)
    recomputed = int(((final >= P) & (final < S)).sum())
    return PrefillResult(logits_of(parts, h), kv, N, recomputed)


def _fused_cache(parts: ModelParts, layout: Layout, prefix_kv: torch.Tensor, chunk_kvs: list[ChunkKV],
                 mode: str, blend: BlendConfig | None, out: torch.Tensor | None):
    """Per mode: the filled cache, the first position computed from layer 0, the blend config."""
    P, S = layout.n_prefix, layout.suffix_start
    if mode == "prefix":
        # Only a chunk cached at exactly its position is a true prefix hit: the first one.
        first = len(layout.chunks[0]) if layout.chunks and chunk_kvs[0].start == P else 0
        kv = fill_cache(parts, layout, prefix_kv, chunk_kvs[:1] if first else [], out)
        start, cfg = P + first, None
    elif mode == "reuse":
        kv, start, cfg = fill_cache(parts, layout, prefix_kv, chunk_kvs, out), S, None
    elif mode == "blend":
        cfg = blend or BlendConfig()
        if cfg.check_layer >= parts.n_layers:
            raise ValueError(f"check_layer {cfg.check_layer} ≥ number of layers {parts.n_layers}")
        kv, start = fill_cache(parts, layout, prefix_kv, chunk_kvs, out), P
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return kv, start, cfg


@torch.inference_mode()
def compute_kv(parts: ModelParts, prefix_kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """KV [L, 2, H, T, D] of `ids` placed right after the prefix (the chunk's canonical position)."""
    P = prefix_kv.shape[3]
    layout = Layout(prefix=[0] * P, chunks=[], suffix=list(ids))
    kv = fill_cache(parts, layout, prefix_kv, [])
    all_ids = torch.tensor(layout.ids(), device=parts.device)
    run_layers(parts, all_ids, kv, torch.arange(P, P + len(ids), device=parts.device))
    return kv[:, :, :, P:].contiguous()
