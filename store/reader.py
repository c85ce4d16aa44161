"""Cold reads of chunk KV from LMDB, fast enough to serve from: every layer's checksum and copy
run on a thread pool, straight into reusable pinned staging buffers (so the host→GPU copy runs at
full DMA speed and asynchronously, instead of through pageable memory)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from store.lmdb_store import KVStore


class StagedReader:
    """`read(key)` returns a pinned CPU tensor that stays valid for the next `slots - 1` reads:
    enough for one request's chunks, whose copies to the GPU finish before the next request."""

    def __init__(self, store: KVStore, *, workers: int | None = None, slots: int = 64, pin: bool | None = None):
        self.store = store
        self.pool = ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1),
                                       thread_name_prefix="kv-read")
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._next = 0
        self._lock = threading.Lock()

    def _staging(self, nbytes: int, slot: int | None) -> torch.Tensor:
        with self._lock:
            if slot is None:
                slot = self._next
                self._next = (self._next + 1) % len(self._buffers)
            buf = self._buffers[slot]
            if buf is None or buf.numel() < nbytes:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
                self._buffers[slot] = buf
        return buf

    def read(self, key: str, fingerprint: str | None = None, slot: int | None = None) -> torch.Tensor | None:
        """KV [L, 2, H, T, D] in a staging buffer, or None when absent; raises CorruptEntry /
        FingerprintMismatch like KVStore.get. `slot`: the buffer to use (a chunk's index in its
        request keeps the pinned buffers few and warm); by default they rotate."""
        head = self.store.header(key)
        if head is None:
            return None
        n = head.shape[0] * head.layer_nbytes
        out = self._staging(n, slot)[:n].view(head.dtype).view(head.shape)
        return self.store.get(key, fingerprint=fingerprint, out=out, pool=self.pool)

    def read_many(self, keys: list[str], fingerprint: str | None = None) -> list[torch.Tensor | None]:
        """A request's chunks at once, into slots 0…len(keys)-1: all their layers verified and
        copied in one wave on the pool."""
        heads = [self.store.header(k) for k in keys]
        outs = []
        for slot, head in enumerate(heads):
            if head is None:
                outs.append(torch.empty(0))
                continue
            n = head.shape[0] * head.layer_nbytes
            outs.append(self._staging(n, slot)[:n].view(head.dtype).view(head.shape))
        got = self.store.get_many(keys, outs, self.pool, fingerprint=fingerprint)
        return [None if h is None else t for h, t in zip(heads, got)]

    def close(self) -> None:
        self.pool.shutdown(wait=False)
