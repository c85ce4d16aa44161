"""ChunkKVCache, the one owner of chunk KV: tiers, one-wave reads, validation and recompute. The
compute callback here is a deterministic function of the ids (the cache never sees a model)."""
from __future__ import annotations

import pytest
import torch

from store import KVStore
from store.hashing import chunk_hash
from store.tiers import ChunkKVCache, KVShape

SHAPE = KVShape("fp-test", n_layers=3, n_kv_heads=2, head_dim=4, dtype=torch.float32)
PREFIX = [1, 2, 3]


def kv_of(ids: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(ids) * 7919 + len(ids))
    return torch.randn(SHAPE.n_layers, 2, SHAPE.n_kv_heads, len(ids), SHAPE.head_dim, generator=g)


class Counting:
    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, ids: list[int]) -> torch.Tensor:
        self.calls.append(list(ids))
        return kv_of(ids)


CHUNKS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def make(tmp_path, **kw) -> tuple[ChunkKVCache, Counting, KVStore]:
    store = KVStore(tmp_path / "kv")
    compute = Counting()
    return ChunkKVCache(SHAPE, PREFIX, compute, device=torch.device("cpu"), store=store, **kw), compute, store


def corrupt(store: KVStore, key: str) -> None:
    raw = bytearray(store._env.begin(db=store._kv).get(key.encode()))
    raw[-5] ^= 0x10
    with store._env.begin(write=True, db=store._kv) as txn:
        txn.put(key.encode(), bytes(raw))


def test_the_key_is_the_content_hash_the_store_is_written_under(tmp_path):
    cache, compute, store = make(tmp_path)
    key, computed = cache.ensure(CHUNKS[0], {"doc_id": "d"})
    assert computed and key == chunk_hash("fp-test", PREFIX, CHUNKS[0]) == cache.key(CHUNKS[0])
    assert store.contains(key) and cache.ensure(CHUNKS[0]) == (key, False)
    assert compute.calls == [CHUNKS[0]]
    assert store.get_meta(key)["doc_id"] == "d"


def test_cold_chunks_are_read_in_one_wave_then_served_from_the_device_tier(tmp_path):
    cache, compute, store = make(tmp_path)
    for ids in CHUNKS:
        cache.ensure(ids)
    got = cache.fetch(CHUNKS)
    assert [c.start for c in got] == [len(PREFIX)] * 3
    for c, ids in zip(got, CHUNKS):
        assert torch.equal(c.kv, kv_of(ids))
    assert cache.store_reads == 3 and cache.recomputed == 0 and len(compute.calls) == 3
    again = cache.fetch(CHUNKS)
    assert cache.store_reads == 3 and cache.stats()["gpu_hits"] == 3
    assert all(a.kv is b.kv for a, b in zip(got, again))  # the same tensors, no copy


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other model", "wrong shape"])
def test_an_unusable_entry_is_recomputed_and_rewritten_never_used(tmp_path, damage):
    cache, compute, store = make(tmp_path)
    for ids in CHUNKS:
        cache.ensure(ids)
    key = cache.key(CHUNKS[1])
    if damage == "missing":
        store.delete_many([key])
    elif damage == "corrupt":
        corrupt(store, key)
    elif damage == "other model":
        store.put(key, kv_of(CHUNKS[1]), "another-fp", {})
    else:
        store.put(key, torch.zeros(SHAPE.n_layers, 2, SHAPE.n_kv_heads, 5, SHAPE.head_dim), "fp-test", {})
    got = cache.fetch(CHUNKS)
    assert all(torch.equal(c.kv, kv_of(ids)) for c, ids in zip(got, CHUNKS))
    assert cache.recomputed == 1 and compute.calls[-1] == CHUNKS[1]
    assert torch.equal(store.get(key, fingerprint="fp-test"), kv_of(CHUNKS[1]))  # written back


def test_refetch_verifies_every_chunk_whole(tmp_path):
    """What the engine calls after a streamed layer failed its checksum mid-prefill."""
    cache, compute, store = make(tmp_path, gpu_bytes=0)
    for ids in CHUNKS:
        cache.ensure(ids)
    corrupt(store, cache.key(CHUNKS[2]))
    got = cache.refetch(CHUNKS)
    assert all(torch.equal(c.kv, kv_of(ids)) for c, ids in zip(got, CHUNKS))
    assert cache.recomputed == 1


def test_without_a_store_the_tiers_hold_what_was_computed(tmp_path):
    compute = Counting()
    cache = ChunkKVCache(SHAPE, PREFIX, compute, device=torch.device("cpu"), gpu_bytes=1 << 30)
    for ids in CHUNKS:
        cache.ensure(ids)
    assert [torch.equal(c.kv, kv_of(ids)) for c, ids in zip(cache.fetch(CHUNKS), CHUNKS)] == [True] * 3
    assert len(compute.calls) == 3 and cache.recomputed == 0


def test_drop_forgets_an_entry_in_every_tier(tmp_path):
    cache, _, store = make(tmp_path)
    key, _ = cache.ensure(CHUNKS[0])
    cache.fetch([CHUNKS[0]])
    assert key in cache.gpu
    assert cache.drop([key]) == 1
    assert key not in cache.gpu and not store.contains(key) and not cache.contains(key)


def test_a_small_device_tier_evicts_but_never_loses_an_answer(tmp_path):
    one = kv_of(CHUNKS[2]).numel() * 4
    cache, compute, _ = make(tmp_path, gpu_bytes=one)
    for ids in CHUNKS:
        cache.ensure(ids)
    for _ in range(2):
        got = cache.fetch(CHUNKS)
        assert all(torch.equal(c.kv, kv_of(ids)) for c, ids in zip(got, CHUNKS))
    assert cache.stats()["gpu_bytes"] <= one and cache.recomputed == 0 and len(compute.calls) == 3


def corrupt_header(store: KVStore, key: str) -> None:
    raw = bytearray(store._env.begin(db=store._kv).get(key.encode()))
    raw[9] ^= 0x10  # inside the header, which its own CRC covers
    with store._env.begin(write=True, db=store._kv) as txn:
        txn.put(key.encode(), bytes(raw))


@pytest.mark.parametrize("damage", [None, "missing", "corrupt header", "other model", "wrong shape"])
def test_a_streamed_fetch_reads_sound_headers_once_and_recomputes_unusable_entries(tmp_path, damage, monkeypatch):
    """The streamed path (here forced on the CPU) plans from the entries it opens: sound ones are
    not read a second time for their headers; an unusable one is recomputed into the store and
    the request still streams exactly what was computed."""
    from store.chunkkv import ArrivingKV

    cache, compute, store = make(tmp_path)
    cache.stream = True
    for ids in CHUNKS:
        cache.ensure(ids)
    key = cache.key(CHUNKS[1])
    if damage == "missing":
        store.delete_many([key])
    elif damage == "corrupt header":
        corrupt_header(store, key)
    elif damage == "other model":
        store.put(key, kv_of(CHUNKS[1]), "another-fp", {})
    elif damage == "wrong shape":
        store.put(key, torch.zeros(SHAPE.n_layers, 2, SHAPE.n_kv_heads, 5, SHAPE.head_dim), "fp-test", {})
    headers = []
    read_header = store.header
    monkeypatch.setattr(store, "header", lambda k: headers.append(k) or read_header(k))
    got = cache.fetch(CHUNKS, layers=[1, 2])
    assert isinstance(got, ArrivingKV)
    chunks = got.wait_all()
    got.close()
    for c, ids in zip(chunks, CHUNKS):
        assert torch.equal(c.kv[1:], kv_of(ids)[1:])
    assert cache.recomputed == (damage is not None)
    assert headers == ([] if damage is None else [cache.key(ids) for ids in CHUNKS])
