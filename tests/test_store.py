"""store/: chunk keys, the KV byte format, the LMDB store and the hot tier, one property each."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not pip-installed and pytest does not add its root
    sys.path.insert(0, str(ROOT))

from store import (  # noqa: E402
    CorruptEntry, FingerprintMismatch, HotTier, KVStore, chunk_hash, decode_kv, encode_kv)

FP = "tiny-llama|sha256:abc|bf16"
SHAPE = (4, 2, 2, 8, 16)  # L, 2, H, T, D
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def random_bits(dtype: torch.dtype, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """Every bit pattern is fair game (NaN payloads, -0.0, subnormals): bit-exact means bits."""
    g = torch.Generator().manual_seed(seed)
    int_dtype = INT_VIEW[dtype]
    info = torch.iinfo(int_dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=int_dtype).view(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


@pytest.fixture
def store(tmp_path):
    with KVStore(tmp_path / "kv.lmdb", map_size=1 << 24) as s:
        yield s


def rewrite_value(store: KVStore, key: str, change) -> None:
    """Edit the stored bytes behind the store's back, as disk corruption would."""
    store.close()
    env = lmdb.open(str(store.path), max_dbs=4, subdir=True)
    db = env.open_db(b"kv")
    with env.begin(write=True) as txn:
        txn.put(key.encode(), bytes(change(bytearray(txn.get(key.encode(), db=db)))), db=db)
    env.close()


def reopen(store: KVStore) -> KVStore:
    return KVStore(store.path)


# -- serialization ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kv_round_trip_is_bit_exact(store, dtype):
    kv = random_bits(dtype)
    assert bits_equal(decode_kv(encode_kv(kv, FP), expect_fingerprint=FP), kv)
    store.put("k", kv, FP, {"n_tokens": 8})
    assert bits_equal(store.get("k", fingerprint=FP), kv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layers", [[2], [3, 0], range(1, 3), []])
def test_reading_a_subset_of_layers_returns_exactly_those_layers(store, dtype, layers):
    kv = random_bits(dtype)
    store.put("k", kv, FP, {})
    got = store.get("k", layers=layers)
    assert got.shape == (len(layers), *SHAPE[1:])
    assert bits_equal(got, kv[list(layers)])


def test_payload_is_raw_layer_major_tensor_bytes():
    kv = random_bits(torch.bfloat16)
    buf = encode_kv(kv, FP)
    raw = kv.view(torch.uint8).numpy().tobytes()
    assert buf[:4] == b"RBKV" and buf.endswith(raw)
    layer = len(raw) // SHAPE[0]
    offset = len(buf) - len(raw)
    assert buf[offset + 2 * layer:offset + 3 * layer] == kv[2].view(torch.uint8).numpy().tobytes()
    assert offset % 64 == 0


def test_decoded_tensor_owns_its_memory():
    buf = bytearray(encode_kv(random_bits(torch.float32), FP))
    got = decode_kv(memoryview(buf))
    before = got.clone()
    buf[-100:] = bytes(100)
    assert bits_equal(got, before)


def test_encode_rejects_wrong_rank_and_dtype():
    with pytest.raises(ValueError):
        encode_kv(torch.zeros(2, 3, 4), FP)
    with pytest.raises(TypeError):
        encode_kv(torch.zeros(1, 2, 1, 1, 1, dtype=torch.int32), FP)


# -- corruption and identity --------------------------------------------------------------------

def test_get_of_absent_key_is_none(store):
    assert store.get("missing") is None and store.get_meta("missing") is None
    assert not store.contains("missing")


HEADER_OFFSETS = {  # byte to flip, given the padded header length h
    "magic": lambda h: 0, "version": lambda h: 4, "dtype": lambda h: 6, "dims": lambda h: 10,
    "fingerprint": lambda h: 26 + 3, "layer_crc": lambda h: 26 + len(FP) + 5,
    "padding": lambda h: h - 8, "header_crc": lambda h: h - 2, "payload": lambda h: -5,
}


@pytest.mark.parametrize("where", HEADER_OFFSETS)
def test_flipped_byte_in_stored_value_raises_corrupt_entry(store, where):
    kv = random_bits(torch.bfloat16)
    store.put("k", kv, FP, {})

    def flip(buf: bytearray) -> bytearray:
        head_len = len(buf) - kv.numel() * kv.element_size()
        buf[HEADER_OFFSETS[where](head_len)] ^= 0x40
        return buf

    rewrite_value(store, "k", flip)
    with reopen(store) as s, pytest.raises(CorruptEntry, match="entry k"):
        s.get("k", fingerprint=FP)


def test_a_corrupt_layer_does_not_block_reading_the_other_layers(store):
    kv = random_bits(torch.float16)
    store.put("k", kv, FP, {})

    def flip_in_last_layer(buf: bytearray) -> bytearray:
        buf[-5] ^= 1
        return buf

    rewrite_value(store, "k", flip_in_last_layer)
    with reopen(store) as s:
        assert bits_equal(s.get("k", layers=range(3)), kv[:3])
        with pytest.raises(CorruptEntry, match="layer 3"):
            s.get("k", layers=[3])


@pytest.mark.parametrize("cut", [0, 3, 30, 64, -1, "extended"])
def test_truncated_or_extended_value_raises_corrupt_entry(store, cut):
    store.put("k", random_bits(torch.float32), FP, {})
    rewrite_value(store, "k", lambda b: b + b"\0" if cut == "extended" else b[:cut])
    with reopen(store) as s, pytest.raises(CorruptEntry):
        s.get("k")


def test_unreadable_meta_raises_corrupt_entry(store):
    store.put("k", random_bits(torch.float32), FP, {"doc_id": "d"})
    store.close()
    env = lmdb.open(str(store.path), max_dbs=4, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"k", b'{"doc_id": "d', db=env.open_db(b"meta", txn=txn))
    env.close()
    with reopen(store) as s, pytest.raises(CorruptEntry, match="meta"):
        s.get_meta("k")


def test_wrong_fingerprint_raises_fingerprint_mismatch(store):
    store.put("k", random_bits(torch.bfloat16), FP, {})
    with pytest.raises(FingerprintMismatch, match="other-model"):
        store.get("k", fingerprint="other-model")
    assert store.get("k") is not None  # no expectation, no check


def test_overwriting_a_corrupt_entry_repairs_it(store):
    kv = random_bits(torch.bfloat16)
    store.put("k", kv, FP, {"v": 1})
    rewrite_value(store, "k", lambda b: b[:-1])
    with reopen(store) as s:
        with pytest.raises(CorruptEntry):
            s.get("k")
        s.put("k", kv, FP, {"v": 2})
        assert bits_equal(s.get("k"), kv) and s.get_meta("k") == {"v": 2}


# -- the LMDB store -----------------------------------------------------------------------------

def test_meta_round_trips_as_json_beside_the_kv(store):
    meta = {"doc_id": "d1", "offsets": [0, 17], "n_tokens": 8, "text": "héllo", "fingerprint": FP}
    kv = random_bits(torch.float32)
    store.put("k", kv, FP, meta)
    assert store.get_meta("k") == meta
    got_kv, got_meta = store.get_entry("k", fingerprint=FP)
    assert bits_equal(got_kv, kv) and got_meta == meta


def test_delete_removes_kv_and_meta_together(store):
    for k in ("a", "b", "c", "d"):
        store.put(k, random_bits(torch.float16), FP, {"k": k})
    assert store.delete("a") and not store.delete("a")
    assert store.get("a") is None and store.get_meta("a") is None
    assert store.delete_many(["b", "c", "zz"]) == 2
    assert sorted(store.keys()) == ["d"] and len(store) == 1


def test_stats_count_entries_and_value_bytes(store):
    kv = random_bits(torch.bfloat16)
    for k in ("a", "b"):
        store.put(k, kv, FP, {})
    st = store.stats()
    assert st["entries"] == 2 and st["kv_bytes"] == 2 * len(encode_kv(kv, FP))
    assert st["meta_bytes"] == 4 and st["path"] == str(store.path)
    assert st["map_size"] >= 1 << 24


def test_tiny_map_grows_to_accept_puts_far_beyond_it(tmp_path):
    kv = torch.randn(4, 2, 2, 64, 16)  # 64 KiB of payload per entry
    with KVStore(tmp_path / "s", map_size=64 * 1024) as s:
        for i in range(64):
            s.put(f"k{i}", kv + i, FP, {"i": i})
        assert s.stats()["map_size"] > 64 * 64 * 1024
        assert len(s) == 64 and all(torch.equal(s.get(f"k{i}"), kv + i) for i in range(64))


def test_readonly_store_reads_but_refuses_writes(tmp_path):
    with KVStore(tmp_path / "s") as s:
        s.put("k", random_bits(torch.float32), FP, {})
    with KVStore(tmp_path / "s", readonly=True) as ro:
        assert ro.contains("k")
        with pytest.raises(PermissionError):
            ro.put("j", random_bits(torch.float32), FP, {})
    with pytest.raises(FileNotFoundError):
        KVStore(tmp_path / "absent", readonly=True)


# -- hot tier -----------------------------------------------------------------------------------

def t_bytes(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8)


def test_hot_tier_evicts_least_recently_used_first():
    hot = HotTier(max_bytes=300)
    for k in "abc":
        hot.put(k, t_bytes(100))
    assert hot.get("a") is not None  # a becomes most recent; b is now the oldest
    hot.put("d", t_bytes(100))
    assert "b" not in hot and all(k in hot for k in "acd")


def test_hot_tier_never_exceeds_its_byte_budget():
    hot = HotTier(max_bytes=1000)
    rng = np.random.default_rng(0)
    for i in range(300):
        hot.put(str(i % 40), t_bytes(int(rng.integers(1, 400))))
        st = hot.stats()
        assert st["bytes"] <= 1000
    assert st["bytes"] == sum(hot.pop(k).numel() for k in list(map(str, range(40))) if k in hot)


def test_hot_tier_counts_hits_and_misses():
    hot = HotTier(max_bytes=1 << 20)
    hot.put("a", t_bytes(10))
    hot.get("a"), hot.get("a"), hot.get("b")
    assert hot.stats() == {"hits": 2, "misses": 1, "entries": 1, "bytes": 10, "max_bytes": 1 << 20}


def test_hot_tier_does_not_cache_a_tensor_larger_than_its_budget():
    hot = HotTier(max_bytes=100)
    hot.put("small", t_bytes(60))
    hot.put("big", t_bytes(101))
    assert "big" not in hot and "small" in hot  # and the oversize put evicted nothing
    hot.put("small", t_bytes(101))
    assert "small" not in hot and hot.stats()["bytes"] == 0  # a superseded value is dropped


def test_hot_tier_replacing_a_key_keeps_byte_count_exact():
    hot = HotTier(max_bytes=1000)
    hot.put("a", t_bytes(300))
    hot.put("a", t_bytes(200))
    assert hot.stats()["bytes"] == 200 and len(hot) == 1
    hot.clear()
    assert hot.stats()["bytes"] == 0 and hot.get("a") is None


def test_hot_tier_stays_consistent_under_concurrent_use():
    hot = HotTier(max_bytes=5000)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            k = str(rng.integers(0, 30))
            if rng.random() < 0.5:
                hot.put(k, t_bytes(int(rng.integers(1, 600))))
            else:
                hot.get(k)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = hot.stats()
    assert st["hits"] + st["misses"] > 0 and st["bytes"] <= 5000
    assert st["bytes"] == sum(hot.pop(k).numel() for k in map(str, range(30)) if k in hot)


# -- chunk hash ---------------------------------------------------------------------------------

def test_chunk_hash_is_stable_for_equal_inputs():
    h = chunk_hash(FP, [1, 2, 3], [4, 5])
    assert h == chunk_hash(FP, (1, 2, 3), np.array([4, 5], dtype=np.int64))
    assert h == chunk_hash(FP, torch.tensor([1, 2, 3]).tolist(), [4, 5])
    assert len(h) == 64 and int(h, 16) >= 0


@pytest.mark.parametrize("other", [
    ("other", [1, 2, 3], [4, 5]),      # fingerprint
    (FP, [1, 2, 9], [4, 5]),           # prefix id
    (FP, [1, 2], [4, 5]),              # prefix length
    (FP, [1, 2, 3], [4, 6]),           # chunk id
    (FP, [1, 2, 3], [4, 5, 0]),        # chunk length
    (FP, [1, 2], [3, 4, 5]),           # same concatenation, different boundary
    (FP, [1, 2, 3, 4, 5], []),
])
def test_chunk_hash_changes_when_any_input_changes(other):
    assert chunk_hash(*other) != chunk_hash(FP, [1, 2, 3], [4, 5])


def test_chunk_hash_encoding_is_frozen():
    # A change here silently invalidates every stored cache: bump _HASH_VERSION on purpose.
    assert chunk_hash("fp", [1, 2], [3]) == \
        "8dbfd3cc29f1f298208e332bc6d2aade3ea367d45685302699244697afe1060d"


def test_chunk_hash_rejects_ids_outside_int32():
    with pytest.raises(ValueError):
        chunk_hash(FP, [2**31], [1])
    with pytest.raises(TypeError):
        chunk_hash(FP, [1.5], [1])


def test_staged_reader_reads_in_parallel_bit_exact_and_detects_corruption(tmp_path):
    """The serving read path (parallel per-layer verify + copy into staging) gives the same
    bytes as the plain path, and a flipped byte in any layer is still caught."""
    from store import StagedReader

    store = KVStore(tmp_path / "kv")
    kv = torch.randn(6, 2, 3, 17, 8).to(torch.bfloat16)
    store.put("k1", kv, "fp", {})
    reader = StagedReader(store, workers=4, slots=2, pin=False)
    got = reader.read("k1", "fp")
    assert torch.equal(got.view(torch.int16), kv.view(torch.int16))
    assert reader.read("absent") is None
    with pytest.raises(FingerprintMismatch):
        reader.read("k1", "other")
    raw = bytearray(store._env.begin(db=store._kv).get(b"k1"))
    raw[-5] ^= 0x40  # a byte in the last layer
    with store._env.begin(write=True, db=store._kv) as txn:
        txn.put(b"k1", bytes(raw))
    with pytest.raises(CorruptEntry, match="layer 5"):
        reader.read("k1", "fp")
    reader.close()
    store.close()


def test_staged_reader_reads_a_whole_request_at_once(tmp_path):
    from store import StagedReader

    store = KVStore(tmp_path / "kv")
    kvs = {f"k{i}": torch.randn(5, 2, 2, 7 + i, 8) for i in range(3)}
    for k, kv in kvs.items():
        store.put(k, kv, "fp", {})
    reader = StagedReader(store, workers=3, slots=8, pin=False)
    got = reader.read_many(["k2", "absent", "k0"], "fp")
    assert got[1] is None
    assert torch.equal(got[0], kvs["k2"]) and torch.equal(got[2], kvs["k0"])
    raw = bytearray(store._env.begin(db=store._kv).get(b"k1"))
    raw[-3] ^= 0x10
    with store._env.begin(write=True, db=store._kv) as txn:
        txn.put(b"k1", bytes(raw))
    with pytest.raises(CorruptEntry, match="layer 4"):
        reader.read_many(["k0", "k1"], "fp")
    with pytest.raises(FingerprintMismatch):
        reader.read_many(["k0"], "other")
    reader.close()
    store.close()


def test_layer_stream_hands_over_layers_in_order_bit_exact(tmp_path):
    """`stream` returns before reading; each wait(i) leaves layer i of every chunk in place,
    bit-exact, and layers never asked for are not read."""
    from store import StagedReader

    store = KVStore(tmp_path / "kv")
    kvs = {f"k{i}": random_bits(torch.bfloat16, (6, 2, 2, 5 + i, 8), seed=i) for i in range(3)}
    for k, kv in kvs.items():
        store.put(k, kv, "fp", {})
    reader = StagedReader(store, workers=3, slots=8, pin=False)
    with reader.stream(["k2", "k0"], [], "fp") as s:
        for t in s.tensors:
            t.fill_(0)  # the staging slots the next stream reuses: what it does not read stays zero
    with reader.stream(["k2", "k0"], [2, 3, 4, 5], "fp") as s:
        time.sleep(0.05)  # nothing is read before start() (or a wait): the caller picks the moment
        assert not (s.flags[2:6] == s.seq).any()
        for i in [2, 3, 4, 5]:
            s.wait(i)
            assert bits_equal(s.tensors[0][i], kvs["k2"][i]) and bits_equal(s.tensors[1][i], kvs["k0"][i])
        assert not s.tensors[0][:2].view(torch.int16).any()
        # the chunks sit side by side in one block, so a layer of the request is one copy
        assert bits_equal(s.block[2:], torch.cat([kvs["k2"][2:], kvs["k0"][2:]], dim=3))
        # each layer announced itself with this request's number, for a GPU stream to wait on
        assert s.flags[2:6].tolist() == [s.seq] * 4 and s.flags[:2].tolist() != [s.seq] * 2
    # a snapshot: an entry overwritten while the stream is open is read as it was
    with reader.stream(["k1"], range(6), "fp") as s:
        store.put("k1", torch.zeros(6, 2, 2, 6, 8, dtype=torch.bfloat16), "fp", {})
        for i in range(6):
            s.wait(i)
        assert bits_equal(s.tensors[0], kvs["k1"])
    reader.close()
    store.close()


def test_a_stream_nobody_starts_reads_by_itself_after_a_second_and_a_closed_one_is_left_alone(tmp_path):
    """The last resort for a caller whose device waits on the flags before it started the reads:
    the shared watchdog starts them; a stream closed (or already started) before then is not
    touched again, and the watchdog keeps serving later streams."""
    from store import StagedReader

    store = KVStore(tmp_path / "kv")
    kv = random_bits(torch.bfloat16, (3, 2, 2, 4, 8))
    store.put("k", kv, "fp", {})
    reader = StagedReader(store, workers=2, slots=4, pin=False)
    for _ in range(2):
        closed = reader.stream(["k"], range(3), "fp")
        closed.close()
        s = reader.stream(["k"], range(3), "fp")
        time.sleep(0.3)
        assert not (s.flags[:3] == s.seq).any()  # nothing read yet: nobody started it
        deadline = time.monotonic() + 5
        while not (s.flags[:3] == s.seq).all():
            assert time.monotonic() < deadline, "the watchdog never started the stream"
            time.sleep(0.02)
        for i in range(3):
            s.wait(i)
            assert bits_equal(s.tensors[0][i], kv[i])
        s.close()
    reader.close()
    store.close()


def test_layer_stream_reports_bad_entries(tmp_path):
    """Absent and foreign entries fail before anything is queued; a corrupt layer fails at the
    wait for that layer (naming the entry), and the layers before it were usable."""
    from store import StagedReader

    store = KVStore(tmp_path / "kv")
    kv = random_bits(torch.float16, (4, 2, 2, 6, 8))
    store.put("good", kv, "fp", {})
    store.put("bad", kv, "fp", {})
    reader = StagedReader(store, workers=2, slots=4, pin=False)
    with pytest.raises(KeyError):
        reader.stream(["good", "absent"], range(4), "fp")
    with pytest.raises(FingerprintMismatch):
        reader.stream(["good"], range(4), "other")
    raw = bytearray(store._env.begin(db=store._kv).get(b"bad"))
    raw[-3] ^= 0x10  # in the last layer
    with store._env.begin(write=True, db=store._kv) as txn:
        txn.put(b"bad", bytes(raw))
    with reader.stream(["good", "bad"], range(4), "fp") as s:
        for i in range(3):
            s.wait(i)
        with pytest.raises(CorruptEntry, match="entry bad: checksum mismatch in layer 3"):
            s.wait(3)
    # nobody waited on the host (a GPU stream waited on the flags): the failure comes at close,
    # and the failed layer's flag was still raised, so that nothing waits forever
    s = reader.stream(["good", "bad"], range(4), "fp")
    with pytest.raises(CorruptEntry, match="entry bad: checksum mismatch in layer 3"):
        s.close()
    assert s.flags[:4].tolist() == [s.seq] * 4
    reader.close()
    store.close()


def test_layer_stream_starts_by_itself_if_never_started(tmp_path):
    """A GPU stream waiting on flags whose reads nobody started would wait forever: after a
    second the reads start anyway."""
    from store import StagedReader

    store = KVStore(tmp_path / "kv")
    store.put("k", random_bits(torch.bfloat16, (3, 2, 2, 4, 8)), "fp", {})
    reader = StagedReader(store, workers=2, slots=2, pin=False)
    s = reader.stream(["k"], range(3), "fp")
    deadline = time.monotonic() + 5
    while not (s.flags[:3] == s.seq).all() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (s.flags[:3] == s.seq).all()
    s.close()
    reader.close()
    store.close()
