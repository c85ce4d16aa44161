"""The value a chunk's precomputed KV travels as, between the engine, the hot tier and the store."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkKV:
    """Per-layer K and V of one chunk's own tokens: `kv` is [L, 2, H_kv, T, D] in the model's dtype.
    Keys carry the RoPE rotation of positions `start … start+T-1`; values carry no position."""
    kv: torch.Tensor
    start: int

    @property
    def n_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ChunkKV":
        return ChunkKV(self.kv.to(device, non_blocking=non_blocking), self.start)
