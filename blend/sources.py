"""KV sources over the LMDB store for the engine (see engine.KVSource): chunk KVs read cold, a
request's chunks at once, or streamed layer by layer into the prefill."""
from __future__ import annotations

from blend.kv import ArrivingKV, ChunkKV
from store.reader import LayerStream, StagedReader


class StoreSource:
    """Chunk KVs read from the store for each request: all of a request's chunks in one wave.
    They land in the reader's staging slots, valid until the reader's next request."""

    def __init__(self, reader: StagedReader, fingerprint: str, start: int):
        self.reader, self.fingerprint, self.start = reader, fingerprint, start
        self.last: LayerStream | None = None  # the last request's stream, for its wait statistics

    def __call__(self, key: str, ids: list[int]) -> ChunkKV:
        kv = self.reader.read(key, self.fingerprint)
        if kv is None:
            raise KeyError(key)
        return ChunkKV(kv, self.start)

    def many(self, keys: list[str], ids_list: list[list[int]]) -> list[ChunkKV]:
        kvs = self.reader.read_many(keys, self.fingerprint)
        missing = [k for k, kv in zip(keys, kvs) if kv is None]
        if missing:
            raise KeyError(", ".join(missing))
        return [ChunkKV(kv, self.start) for kv in kvs]


class StreamingStoreSource(StoreSource):
    """…and handed to the prefill layer by layer while the later layers are still being read."""

    def stream(self, keys: list[str], ids_list: list[list[int]], layers: list[int]) -> ArrivingKV:
        s = self.last = self.reader.stream(keys, layers, self.fingerprint)
        return ArrivingKV([ChunkKV(t, self.start) for t in s.tensors], layers, s.wait, s.close, s.start,
                          s.block, s.flags, s.seq)
