"""Indexing and answering through the store: incremental, consistent after failures, and the
KV read back from LMDB answers exactly like KV computed in memory."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from api.service import RagService
from blend.engine import Engine
from blend.loader import load_model
from blend.spec import QuerySpec
from retrieval import Document
from retrieval.testing import HashEmbedder

pytestmark = pytest.mark.real  # the tiny model speaks the bundled tokenizer

WORDS = "bridge river town engineer concrete harbour winter railway museum church".split()


def corpus_docs(n: int, paragraphs: int = 4) -> list[Document]:
    docs = []
    for i in range(n):
        text = "\n\n".join(" ".join(f"{WORDS[(i + j + k) % len(WORDS)]}{i}" for k in range(40))
                           for j in range(paragraphs))
        docs.append(Document(id=f"doc{i}.txt", text=text, source=f"doc{i}.txt", metadata={}))
    return docs


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine(load_model("random:tiny-smol"))


@pytest.fixture()
def service(tmp_path, tiny_engine):
    svc = RagService(tmp_path / "data", engine=tiny_engine, embedder=HashEmbedder(), chunk_tokens=64)
    yield svc
    svc.close()


def test_reindexing_unchanged_documents_computes_nothing(service):
    docs = corpus_docs(3)
    first = service.index_documents(docs)
    # KV is content-addressed: chunks with the same tokens share one entry
    assert first.kv_computed == len(service.store) == len(service.corpus.registry.kv_keys_in_use()) > 3
    again = service.index_documents(docs)
    assert (again.unchanged, again.kv_computed, again.chunks) == (3, 0, 0)


def test_changed_document_replaces_its_chunks_and_kv(service):
    docs = corpus_docs(2)
    service.index_documents(docs)
    before = set(service.store.keys())
    changed = Document(id="doc0.txt", text="an entirely new text about ferries", source="doc0.txt", metadata={})
    report = service.index_documents([changed])
    assert report.kv_computed == 1 and report.kv_deleted >= 1
    after = set(service.store.keys())
    assert after == service.corpus.registry.kv_keys_in_use()
    assert len(after - before) == 1


def test_deleting_a_document_removes_vectors_rows_and_kv(service):
    service.index_documents(corpus_docs(3))
    keys = {c["kv_key"] for c in service.corpus.registry.chunks_of("doc1.txt")}
    n_before = len(service.corpus)
    assert service.delete_document("doc1.txt")
    assert service.corpus.registry.get_document("doc1.txt") is None
    assert len(service.corpus) == n_before - len(keys)
    assert not any(service.store.contains(k) for k in keys)
    assert all(h.doc_id != "doc1.txt" for h in service.corpus.search("bridge1 river1", 50))
    assert not service.delete_document("doc1.txt")


def test_corrupt_stored_kv_is_detected_and_recomputed(service):
    service.index_documents(corpus_docs(1))
    key = next(iter(service.store.keys()))
    ids = None
    for c in service.corpus.registry.chunks_of("doc0.txt"):
        if c["kv_key"] == key:
            ids = service.engine.prompts.chunk_ids(c["text"])
    assert service.kv.key(ids) == key  # the cache computes the key the index recorded
    good = service.kv.fetch([ids])[0].kv.clone()
    service.kv.gpu.clear()
    env, db = service.store._env, service.store._kv
    raw = bytearray(env.begin(db=db).get(key.encode()))
    raw[len(raw) // 2] ^= 0x01
    with env.begin(write=True, db=db) as txn:
        txn.put(key.encode(), bytes(raw))
    again = service.kv.fetch([ids])[0].kv
    assert service.kv.recomputed == 1
    assert (again - good).abs().max().item() < 1e-6
    assert service.store.get(key, fingerprint=service.engine.fingerprint) is not None  # rewritten


def _index_cmd(root: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "api.cli", "index", str(root), "--data-dir", str(data),
            "--model", "random:tiny-smol", "--chunk-tokens", "48", "--json"]


def _committed_documents(registry: Path) -> int:
    """Documents the indexer has committed so far (read like any concurrent reader would)."""
    if not registry.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{registry}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM documents").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_index_killed_mid_run_resumes_complete_and_consistent(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for doc in corpus_docs(40, paragraphs=6):
        (root / doc.id).write_text(doc.text)
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_index_cmd(root, data), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    registry = data / "corpus" / "registry.sqlite"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until some documents committed
        if _committed_documents(registry) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "indexing finished before it could be killed; make the corpus larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_index_cmd(root, data), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < summary["unchanged"] < 40  # the killed run committed some documents, not all
    stats = subprocess.run([sys.executable, "-m", "api.cli", "store", "stats", "--data-dir", str(data)],
                           capture_output=True, text=True, timeout=120)
    s = json.loads(stats.stdout)
    assert s["documents"] == 40
    assert s["missing_entries"] == 0  # every chunk's KV is present
    again = subprocess.run(_index_cmd(root, data), env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout.strip().splitlines()[-1])["kv_computed"] == 0
    # KV the killed run wrote for a document it never committed is what `store gc` removes
    gc = subprocess.run([sys.executable, "-m", "api.cli", "store", "gc", "--data-dir", str(data), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["removed"] == s["unreferenced_entries"]
    after = json.loads(subprocess.run([sys.executable, "-m", "api.cli", "store", "stats", "--data-dir", str(data)],
                                      capture_output=True, text=True, timeout=120).stdout)
    assert after["unreferenced_entries"] == 0 and after["missing_entries"] == 0


def test_blend_answer_from_lmdb_equals_answer_from_memory(tmp_path):
    """On the real SmolLM2: KV read back from LMDB (the data dir's default format, int8) gives
    exactly the tokens and logits of the same format's KV computed in memory."""
    engine = Engine(load_model("default"))
    svc = RagService(tmp_path / "data", engine=engine, embedder=HashEmbedder(), chunk_tokens=96)
    try:
        sample = Path(__file__).parent.parent / "samples" / "corpus"
        from retrieval import load_path
        svc.index_documents(load_path(sample))
        question = "Who designed the Halvard Bridge?"
        hits = svc.retrieve(question, 4).hits
        spec = QuerySpec(max_tokens=12)
        svc.kv.gpu.clear()  # read back from LMDB, not the tier that indexing left warm
        from_store = svc.answer(question, hits, spec).run()
        layout = svc.layout(question, hits)  # the order the service lays them out in
        assert svc.kv.format.name == "int8"
        memory = engine.kv_cache(layout.prefix, gpu_bytes=1 << 40, stream=False, kv_format=svc.kv.format)
        in_memory = engine.generate(layout, spec, memory).run()
        assert from_store.token_ids == in_memory.token_ids
        assert (from_store.first_logits - in_memory.first_logits).abs().max().item() == 0.0
        assert svc.kv.recomputed == 0 and svc.kv.store_reads == len(hits)
    finally:
        svc.close()


def test_store_gc_removes_only_unreferenced_kv(service):
    service.index_documents(corpus_docs(2))
    referenced = set(service.store.keys())
    orphan = service.kv.key([1, 2, 3])
    service.store.put(orphan, torch.zeros(4, 2, 2, 3, 16), service.engine.fingerprint, {"doc_id": "gone"})
    data = service.data_dir
    service.close()
    gc = subprocess.run([sys.executable, "-m", "api.cli", "store", "gc", "--data-dir", str(data), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout) == {"removed": 1, "remaining": len(referenced)}
    from store import KVStore
    with KVStore(data / "kv", readonly=True) as store:
        assert set(store.keys()) == referenced
