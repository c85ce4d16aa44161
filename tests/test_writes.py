"""Indexing's store writes pipelined behind the chunk compute (store/writes.py): the entries are
the bytes an in-line write stores, every one is in the store before its document's registry
commit, and a write that fails fails the document, which is committed by the next run."""
from __future__ import annotations

import pytest

from api.service import RagService
from blend.engine import Engine
from blend.loader import load_model
from retrieval import Document
from retrieval.testing import HashEmbedder
from store.writes import PipelinedWrites

pytestmark = pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer

DOCS = [Document(f"d{i}", " ".join(f"The {w} number {j} lives in the {p} and eats {f}." for j in range(9)), "api")
        for i, (w, p, f) in enumerate([("okapi", "forest", "leaves"), ("heron", "river", "fish"),
                                       ("ibex", "mountains", "grass")])]


@pytest.fixture(scope="module")
def engine():
    return Engine(load_model("random:tiny-smol"))


def service(engine, path) -> RagService:
    return RagService(path, engine=engine, embedder=HashEmbedder(), chunk_tokens=24)


def entries(svc: RagService) -> dict[str, bytes]:
    with svc.store.snapshot() as txn:
        return {k: bytes(svc.store.raw(txn, k)) for k in svc.store.keys()}


def test_pipelined_entries_are_the_bytes_of_in_line_writes_and_written_before_the_commit(engine, tmp_path):
    piped = service(engine, tmp_path / "piped")
    inline = service(engine, tmp_path / "inline")
    seen_at_commit = []
    commit = piped.corpus.upsert

    def upsert(doc, chunks, keys, *a, **kw):  # what the store holds when the registry commits
        seen_at_commit.append(all(piped.store.contains(k) for k in keys))
        return commit(doc, chunks, keys, *a, **kw)
    piped.corpus.upsert = upsert
    try:
        report = piped.index_documents(DOCS)
        assert report.chunks > len(DOCS) and report.kv_computed == len(set(entries(piped)))
        assert seen_at_commit == [True] * len(DOCS)
        writer = piped.kv._writer  # one thread and one set of kept buffers for the whole run
        assert writer is not None and writer.reused > 0 and not writer.keys
        for doc in DOCS:  # one chunk at a time, each written in line
            for c in piped.corpus.registry.chunks_of(doc.id):
                inline.kv.ensure(inline.engine.prompts.chunk_ids(c["text"]), {"doc_id": doc.id})
        a, b = entries(piped), entries(inline)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    finally:
        piped.close()
        inline.close()


class FailingStore:
    """The data dir's real store, except that its `fail_at`-th write fails as a full disk does."""

    def __init__(self, store, fail_at: int):
        self.store, self.fail_at, self.writes = store, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put_encoded(self, key, value, meta, if_absent=False):
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device (injected)")
        return self.store.put_encoded(key, value, meta, if_absent=if_absent)


def test_a_failed_pipelined_write_fails_its_document_uncommitted_and_the_next_run_commits_it(engine, tmp_path):
    svc = service(engine, tmp_path / "data")
    try:
        real = svc.kv.store
        svc.kv.store = FailingStore(real, fail_at=2)
        with pytest.raises(OSError, match="No space left"):
            svc.index_document(DOCS[0])
        assert svc.corpus.registry.chunks_of("d0") == []  # nothing committed without its KV
        written = set(real.keys())  # the writes before the failure, and those queued behind it
        assert written
        svc.kv.store = real
        report = svc.index_documents(DOCS[:1])
        keys = [c["kv_key"] for c in svc.corpus.registry.chunks_of("d0")]
        assert report.committed == 1 and keys and all(real.contains(k) for k in keys)
        assert len(set(keys)) == len(keys) > 2
        assert report.kv_computed == len(keys) - len(written)  # what was written is reused
    finally:
        svc.close()


def test_writes_drain_in_order_and_a_failure_is_raised_by_drain_or_the_next_submit():
    done = []
    w = PipelinedWrites(depth=2)
    for i in range(5):
        w.submit(f"k{i}", lambda i=i: done.append(i))
    assert w.keys == {f"k{i}" for i in range(5)}
    w.drain()
    assert done == [0, 1, 2, 3, 4] and w.keys == set()  # written: the store has them now

    def fail():
        raise ValueError("bad write")
    w.submit("bad", fail)
    with pytest.raises(ValueError, match="bad write"):
        w.drain()
    w.close()


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_an_entry_staged_into_a_kept_buffer_is_the_fresh_entry_byte_for_byte(fmt):
    """A kept buffer still holds the last entry's bytes (here 0xAB everywhere): every byte of the
    new entry, the header's padding included, is written over them."""
    import torch

    from store.serialize import encode_kv, seal_kv, stage_kv

    kv = torch.randn(3, 2, 2, 7, 16).to(torch.bfloat16)
    fresh = encode_kv(kv, "fp", fmt, "k" * 64)
    dirty = bytearray(b"\xab" * len(fresh))
    given = []
    staged = stage_kv(kv, "fp", fmt, "k" * 64, alloc=lambda n: given.append(n) or dirty)
    assert staged is dirty and given == [len(fresh)]
    assert bytes(seal_kv(staged)) == bytes(fresh)
    with pytest.raises(ValueError, match="a buffer of"):
        stage_kv(kv, "fp", fmt, "k" * 64, alloc=lambda n: bytearray(n + 1))


def test_finished_writes_give_their_buffers_to_the_next_entries_of_their_length():
    w = PipelinedWrites(depth=2)
    a = w.buffer(100)
    w.submit("a", lambda: None, a)
    w.drain()
    assert w.buffer(100) is a and w.reused == 1
    assert len(w.buffer(50)) == 50 and w.reused == 1  # none of that length: a new one
    w.close()
