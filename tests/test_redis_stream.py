"""Chunk KV streamed layer by layer from the shared tier (issue 25, item 2), on CPU against a REAL
redis-server: each layer arrives bit for bit as a whole read gives it, with the arrival flags of
an LMDB stream; a damaged layer fails at its wait; the prefill over streamed KV gives the logits
and tokens of the whole read; the local LMDB cache keeps its own stream. (The CUDA path:
tests/test_cuda.py.)"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("redis", reason="the redis client is not installed (pip install 'redis>=5')")

from blend.engine import Engine  # noqa: E402
from blend.loader import LoadedModel, fingerprint  # noqa: E402
from blend.shapes import random_model  # noqa: E402
from blend.spec import BlendConfig, QuerySpec  # noqa: E402
from store.backend import open_kv_store  # noqa: E402
from store.chunkkv import ChunkKV  # noqa: E402
from store.redis_store import RedisKVStore  # noqa: E402
from store.redis_stream import SharedStreamReader, TieredStreamReader  # noqa: E402
from store.redis_store import StoreUnavailable  # noqa: E402
from store.serialize import CorruptEntry, to_kv  # noqa: E402
from tests.test_blend import make_layout  # noqa: E402
from tests.test_quant import FP, realistic_kv  # noqa: E402
# the real redis-server of the tier's own tests, one per module, emptied for each test
from tests.test_redis_store import Server, server, url  # noqa: E402,F401


@pytest.mark.parametrize("fetchers", [1, 3])
@pytest.mark.parametrize("fmt", ["float32", "int8", "bfloat16"])
def test_a_streamed_shared_read_hands_over_each_layer_bit_exact_like_a_whole_read(url, fmt, fetchers):
    """Float entries wanted in their dtype land in the staging block; quantized ones (or another
    float format) as packed rows decoded per layer; either way every layer asked for is announced
    on its flag once in place, and equals the whole read — with one fetch connection or several
    taking the layers in turn."""
    shared = RedisKVStore(url, fmt=fmt)
    kvs = {f"k{i}": realistic_kv(L=4, H=2, T=5 + 3 * i, D=16, seed=i) for i in range(3)}
    for k, kv in kvs.items():
        shared.put(k, kv, FP)
    reader = SharedStreamReader(shared, workers=2, pin=False, fetchers=fetchers)
    keys = ["k2", "k0", "k1"]
    wholes = [to_kv(*shared.get_raw(k, fingerprint=FP), torch.float32) for k in keys]
    with reader.stream(keys, [3, 1, 2], FP, dtype=torch.float32) as s:
        assert s.flags is not None
        for i in (3, 1, 2):
            s.wait(i)
            assert int(s.flags[i]) == s.seq
        assert int(s.flags[0]) != s.seq  # a layer not asked for is never announced
        for t, whole in zip(s.tensors, wholes):
            assert torch.equal(t[1:].view(torch.uint8), whole[1:].view(torch.uint8))
    assert reader.streams == 1
    reader.close()
    shared.close()


@pytest.mark.parametrize("fetchers", [1, 2])
def test_a_damaged_shared_layer_fails_at_its_wait_and_an_absent_entry_before_any_read(url, server, fetchers):
    shared = RedisKVStore(url, fmt="float32")
    kv = realistic_kv(L=4, H=2, T=6, D=16)
    shared.put("good", kv, FP)
    shared.put("bad", kv, FP)
    server.client.setrange(shared._k("bad"), server.client.strlen(shared._k("bad")) - 3, b"\x00\x01\x02")
    reader = SharedStreamReader(shared, workers=2, pin=False, fetchers=fetchers)
    with pytest.raises(KeyError):
        reader.stream(["good", "absent"], range(4), FP)
    with reader.stream(["good", "bad"], range(4), FP) as s:
        for i in range(3):
            s.wait(i)
        with pytest.raises(CorruptEntry, match="entry bad: checksum mismatch in layer 3"):
            s.wait(3)
    # nobody waited on the host: the failure comes at close, and every flag was still raised
    s = reader.stream(["good", "bad"], range(4), FP)
    with pytest.raises(CorruptEntry, match="entry bad"):
        s.close()
    assert s.flags[:4].tolist() == [s.seq] * 4
    reader.close()
    shared.close()


def test_streams_reuse_their_entry_buffers_and_a_reused_buffer_never_shows_the_last_entry(url):
    """The second stream's entries (other bytes, the same lengths) land in the first one's
    buffers, bit-exact; a layer that does not arrive in a reused buffer is zeros, so it fails its
    CRC instead of passing off what the last entry had there."""
    shared = RedisKVStore(url, fmt="int8")
    for name, seed in (("a", 1), ("b", 2)):
        shared.put(name, realistic_kv(L=4, H=2, T=7, D=16, seed=seed), FP)
    reader = SharedStreamReader(shared, workers=2, pin=False)
    for key in ("a", "b"):
        whole = shared.get_raw(key, fingerprint=FP)[0]
        with reader.stream([key], range(4), FP, dtype=torch.float32) as s:
            for i in range(4):
                s.arrived(i)
            assert torch.equal(s.packed.rows[:, :whole.shape[1]], whole)
        reader.settle()
    assert (reader.buffers.allocated, reader.buffers.reused) == (1, 1)

    head_bytes, head = shared.header_bytes(["a"])[0][1], shared.header("a")
    entry = reader.buffers.take(len(shared.values(["a"])[0]), head_bytes, head)  # holds b's layers
    entry.arrive(0, b"short")  # the value changed since its header was read
    entry.give_up()            # layers 1-3 never came
    payload = memoryview(entry)[head.payload_offset:]
    assert not any(payload)
    reader.close()
    shared.close()


def test_an_unreachable_tier_streams_nothing_and_reads_as_absent(tmp_path):
    s = Server(tmp_path / "gone")
    shared = RedisKVStore(s.url, fmt="float32")
    shared.put("k", realistic_kv(L=2, H=2, T=4, D=16), FP)
    s.stop()
    reader = SharedStreamReader(shared, workers=1, pin=False)
    with pytest.raises(KeyError):  # the cache then reads whole, which recomputes
        reader.stream(["k"], range(2), FP)
    reader.close()
    shared.close()


class StreamedSource:
    """A ChunkKVSource that serves a layout's chunks through a stream of every layer, waited
    for on the host: the CPU stand-in for the CUDA prefill that consumes layers as they arrive."""

    def __init__(self, cache, reader):
        self.cache, self.reader = cache, reader

    def fetch(self, chunks, layers=None):
        keys = [self.cache.key(ids) for ids in chunks]
        s = self.reader.stream(keys, range(self.cache.shape.n_layers), self.cache.shape.fingerprint,
                               dtype=self.cache.shape.dtype)
        with s:
            for i in range(self.cache.shape.n_layers):
                s.wait(i)
            return [ChunkKV(t.clone(), self.cache.start) for t in s.tensors]

    def refetch(self, chunks):
        raise AssertionError("nothing failed")


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_a_prefill_over_streamed_shared_kv_gives_the_logits_of_the_whole_read(tmp_path, url, fmt):
    model = random_model("tiny-llama", dtype=torch.float32, seed=0, std=0.1)
    engine = Engine(LoadedModel(model, None, "tiny-llama", fingerprint(model)))
    layout = make_layout()
    store = open_kv_store(tmp_path / "kv", url + "?local_cache=0")
    store.configure(kv_format=fmt)
    whole = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, kv_format=fmt)
    for ids in layout.chunks:
        whole.ensure(ids)
    streamed = StreamedSource(whole, SharedStreamReader(store.shared, workers=2, pin=False))
    for mode, ratio in (("reuse", 0.0), ("blend", 0.15)):
        spec = QuerySpec(mode, BlendConfig(ratio=ratio), max_tokens=8)
        a = engine.generate(layout, spec, whole).run()
        b = engine.generate(layout, spec, streamed).run()
        assert torch.equal(a.first_logits, b.first_logits) and a.token_ids == b.token_ids, mode
    assert whole.store_reads > 0 and whole.recomputed == 0
    streamed.reader.close()
    store.close()


@pytest.mark.parametrize("fetchers", ["", "?fetchers=2"], ids=["default", "two-connections"])
def test_the_local_cache_keeps_its_own_stream_and_takes_what_streamed_whole_from_the_tier(tmp_path, url, fetchers):
    """A request whose chunks are all in the local LMDB streams from it (zero-copy, no round
    trip); any other streams from the tier, and entries that arrived whole and verified are
    copied into the local cache, so the next request streams locally."""
    kv = {f"k{i}": realistic_kv(L=3, H=2, T=4 + i, D=16, seed=i) for i in range(2)}
    tiered = open_kv_store(tmp_path / "kv", url + fetchers)
    assert tiered.fetchers == (2 if fetchers else None)
    tiered.configure(kv_format="float32")
    for k, v in kv.items():
        tiered.shared.put(k, v, FP)  # another replica's entries: on the tier, not in this local cache
    reader = tiered.layer_reader(workers=2, pin=False)
    assert isinstance(reader, TieredStreamReader)
    with reader.stream(list(kv), [2], FP) as s:  # the prefill needs one layer; the tail reads the rest
        s.wait(2)
    reader.settle()  # the copy into the local cache runs after the stream, off the request's path
    assert reader.remote.streams == 1 and all(tiered.local.contains(k) for k in kv)
    with reader.stream(list(kv), range(3), FP) as s:
        for i in range(3):
            s.wait(i)
        for t, k in zip(s.tensors, kv):
            assert torch.equal(t, kv[k])
    assert reader.remote.streams == 1  # the second came from the local cache
    reader.close()
    tiered.close()


class FailsAtLayer:
    """The real tier, except that reading one layer fails as a lost connection does."""

    def __init__(self, shared, layer: int):
        self.shared, self.layer = shared, layer

    def __getattr__(self, name):
        return getattr(self.shared, name)

    def layer_spans(self, keys, heads, layer):
        if layer == self.layer:
            raise StoreUnavailable("connection lost (injected)")
        return self.shared.layer_spans(keys, heads, layer)


@pytest.mark.parametrize("fetchers", [1, 2, 4])
def test_a_fetch_connection_that_fails_voids_its_layers_and_no_wait_hangs(url, fetchers):
    """One fetch thread's read fails mid-stream: every layer still gets its flag (the failed and
    unread ones as zeros, which fail their CRC), the other threads stop, and nothing that failed
    is copied into a local cache."""
    shared = RedisKVStore(url, fmt="float32")
    kvs = {f"k{i}": realistic_kv(L=6, H=2, T=5, D=16, seed=i) for i in range(2)}
    for k, kv in kvs.items():
        shared.put(k, kv, FP)
    kept = []

    class Local:
        def put_encoded(self, key, value, meta):
            kept.append(key)
    reader = SharedStreamReader(FailsAtLayer(shared, 2), workers=2, pin=False, fetchers=fetchers, cache_into=Local())
    s = reader.stream(list(kvs), range(6), FP, dtype=torch.float32)
    with pytest.raises(CorruptEntry, match="checksum mismatch"):  # at 2, or sooner where another thread stopped
        for i in range(6):
            s.wait(i)
    s.close()
    s = reader.stream(list(kvs), range(6), FP, dtype=torch.float32)
    with pytest.raises(CorruptEntry):  # nobody waited: the failure comes at close, every flag raised
        s.close()
    assert s.flags[:6].tolist() == [s.seq] * 6
    reader.settle()
    assert kept == []
    reader.close()
    shared.close()
