"""An in-memory LRU of chunk KVs with a byte budget, in front of LMDB.

store.tiers.ChunkKVCache keeps two: one on the device (no copy at all on a hit) and, on CUDA,
one of pinned CPU tensors (a hit is one async host-to-device copy instead of an LMDB read and a
checksum).
The budget is in bytes, not entries, because chunk KVs differ in size by their token count.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


def _nbytes(t: torch.Tensor) -> int:
    # The storage, not the view: a cached slice keeps its whole base tensor alive.
    return max(t.untyped_storage().nbytes(), t.numel() * t.element_size())


class HotTier:
    """Thread-safe byte-budgeted LRU of tensors on one device."""

    def __init__(self, max_bytes: int, device: str | torch.device = "cpu",
                 pin: bool = False) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device)
        # Pinning only helps (and only works) for CPU memory that will be copied to a GPU.
        self.pin = pin and self.device.type == "cpu" and torch.cuda.is_available()
        self._items: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return item[0]

    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Cache `tensor` on this tier's device and return that copy.

        Evicts least recently used entries until the budget holds. A tensor larger than the
        whole budget is not cached (it would evict everything and then itself), but any older
        value under `key` is dropped since it is superseded. Do not mutate the returned tensor:
        the cache holds the same object.
        """
        if tensor.numel() * tensor.element_size() > self.max_bytes:
            self.pop(key)
            return tensor.to(self.device, non_blocking=tensor.is_pinned())
        # Copy outside the lock: a device transfer can take milliseconds.
        if self.pin and not tensor.is_pinned():
            # One copy straight into page-locked memory, not device -> pageable -> pinned.
            t = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
        else:  # from pinned memory the copy is queued on the stream, not waited for
            t = tensor.to(self.device, non_blocking=tensor.is_pinned())
        size = _nbytes(t)
        with self._lock:
            self._remove(key)
            if size > self.max_bytes:
                return t
            while self._bytes + size > self.max_bytes:
                self._remove(next(iter(self._items)))
            self._items[key] = (t, size)
            self._bytes += size
        return t

    def pop(self, key: str) -> torch.Tensor | None:
        with self._lock:
            return self._remove(key)

    def _remove(self, key: str) -> torch.Tensor | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self._bytes -= item[1]
        return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __contains__(self, key: str) -> bool:
        """Membership without touching LRU order or the hit/miss counters."""
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "entries": len(self._items),
                    "bytes": self._bytes, "max_bytes": self.max_bytes}
