"""CacheBlend's token selection: which chunk tokens deviate most from their cached KV."""
from __future__ import annotations

import math

import torch


def deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance per token, summed over heads and head dims: [1, H, T, D] → [T]."""
    diff = fresh.float() - cached.float()
    return diff.square().sum(dim=(0, 1, 3))


def n_selected(ratio: float, n_chunk_tokens: int) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return min(n_chunk_tokens, math.ceil(ratio * n_chunk_tokens - 1e-9))


def select_tokens(dev: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (ascending) of the ⌈ratio·C⌉ chunk tokens with the largest deviation."""
    k = n_selected(ratio, dev.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dev.device)
    return torch.topk(dev, k, sorted=False).indices.sort().values
