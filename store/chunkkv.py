"""The value a chunk's precomputed KV travels as, between the KV cache's tiers and the engine."""
from __future__ import annotations

from collections.abc import Callable, Sequence
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


@dataclass
class PackedLayers:
    """A streamed request's chunk KV as stored (quantized, or a float format other than the
    model's): per layer, every chunk's row packed side by side (store.quant) in pinned host
    memory. `decode_into(i, out)` queues, on the current stream of out's device, the copy of layer
    i's row there and its decoding into `out` [2, H, ΣT, D]; the caller orders it after the
    layer's arrival (a flag wait on that stream). `decode_rows(lo, hi, out)` does so for layers
    lo…hi-1 at once, into out [hi-lo, 2, H, ΣT, D]: one copy and one decode launch."""
    rows: torch.Tensor
    decode_into: Callable[[int, torch.Tensor], None]
    decode_rows: Callable[[int, int, torch.Tensor], None]


@dataclass
class ArrivingKV:
    """A request's chunk KVs whose layers are still landing in (pinned) host memory, in the
    order `layers`: layer i of every chunk is in place once `wait(i)` returns. The prefill
    consumes each layer as it arrives instead of waiting for the whole read; `close()` ends the
    read (it is called once the prefill has queued every copy). `block`, when the chunks are
    views of one [L, 2, H, ΣT, D] tensor side by side in layout order, lets a layer of the whole
    request move to the device in one copy. `flags` (pinned int32, one per layer): `seq` is
    written to flags[i] once layer i is in place, so a CUDA stream can wait for it instead of
    the host; `close()` then raises if a layer turned out corrupt (the prefill is void).
    `packed`: the layers as stored, for a GPU-side decode of each (then `block` is filled only by
    `wait`, where the host waits instead)."""
    chunks: list[ChunkKV]
    layers: list[int]
    wait: Callable[[int], None]
    close: Callable[[], None]
    start: Callable[[int | None], None] = lambda through=None: None  # begin the reads (of layers up to `through`)
    block: torch.Tensor | None = None
    flags: torch.Tensor | None = None
    seq: int = 0
    packed: PackedLayers | None = None
    nbytes: int = 0  # what the reads move
    # on CUDA, where the layers land on the device in the model's dtype (see LayerStream.land)
    landing: torch.Tensor | None = None
    land: Callable[[int], None] | None = None
    land_rows: Callable[[int, int], None] | None = None  # land() for layers lo…hi-1 at once
    loaded: Callable[[], tuple[int, float] | None] | None = None  # (bytes, seconds), once read

    def wait_all(self) -> list[ChunkKV]:
        for i in self.layers:
            self.wait(i)
        return self.chunks


@dataclass(frozen=True)
class ChunkRef:
    """A chunk as a request asks for it: its token ids, and the chunks (token ids, in order) its
    KV was computed behind, between the prompt head and itself (neighbour-aware entries,
    FusionRAG-style); no context is the plain entry. The context is part of the store key, so an
    entry computed behind other chunks is never served for this one."""
    ids: tuple[int, ...]
    context: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, chunk: "ChunkRef | Sequence[int]") -> "ChunkRef":
        return chunk if isinstance(chunk, ChunkRef) else cls(tuple(map(int, chunk)))

    @property
    def context_ids(self) -> list[int]:
        """The context chunks' ids side by side, as they sat in front of the chunk."""
        return [t for ids in self.context for t in ids]

    @property
    def n_context(self) -> int:
        return sum(len(ids) for ids in self.context)
