"""Corpus: registry + index kept consistent through upserts, deletes, crashes and concurrency."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from retrieval import Corpus, Document, chunk_text
from retrieval.corpus import INDEX_FILE, content_hash
from retrieval.testing import HashEmbedder, WhitespaceTokenizer

WS = WhitespaceTokenizer()
PARAMS = "max_tokens=8;tokenizer=whitespace"


def add(corpus: Corpus, doc_id: str, text: str, kv_prefix: str | None = None) -> list[str]:
    """Chunk, embed and upsert like the indexer does; kv keys name the chunk text by default."""
    doc = Document(id=doc_id, text=text, source=f"{doc_id}.txt", metadata={"n": len(text)})
    chunks = chunk_text(doc_id, text, WS, max_tokens=8)
    keys = [f"{kv_prefix}{c.index}" if kv_prefix else f"kv:{c.text}" for c in chunks]
    return corpus.upsert(doc, chunks, keys, corpus.embedder.encode([c.text for c in chunks]), params=PARAMS)


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    c = Corpus(tmp_path, HashEmbedder())
    add(c, "fruit", "apples and pears grow on trees.\n\nbananas grow in warm places.")
    add(c, "space", "rockets reach orbit with enough speed.\n\nthe moon circles the earth.")
    return c


def consistent(corpus: Corpus) -> None:
    """Every registry chunk is findable by its own embedding, and search returns nothing else."""
    rows = [r for d in corpus.registry.list_documents() for r in corpus.registry.chunks_of(d["doc_id"])]
    for r in rows:
        hits = corpus.search(r["text"], k=len(rows) + 3)
        assert hits[0].chunk_id == r["chunk_id"] and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert {h.chunk_id for h in hits} == {x["chunk_id"] for x in rows}


def test_upsert_then_search_finds_the_document(corpus: Corpus):
    [hit] = corpus.search("bananas warm", k=1)
    assert (hit.doc_id, hit.text, hit.kv_key, hit.n_tokens) == ("fruit", "bananas grow in warm places.",
                                                                "kv:bananas grow in warm places.", 5)
    assert corpus.search("moon earth", k=1)[0].doc_id == "space"
    assert len(corpus) == 4
    consistent(corpus)


def test_reupsert_replaces_chunks_and_old_ones_leave_search(corpus: Corpus):
    old_ids = {r["chunk_id"] for r in corpus.registry.chunks_of("fruit")}
    orphaned = add(corpus, "fruit", "cherries are small red fruit.")
    assert orphaned == ["kv:apples and pears grow on trees.", "kv:bananas grow in warm places."]
    hits = corpus.search("apples pears bananas", k=10)
    assert not old_ids & {h.chunk_id for h in hits}
    assert [h.text for h in hits if h.doc_id == "fruit"] == ["cherries are small red fruit."]
    assert len(corpus) == 3 and corpus.registry.get_document("fruit")["n_chunks"] == 1
    consistent(corpus)


def test_delete_removes_vectors_rows_and_returns_kv_keys(corpus: Corpus):
    generation = corpus.registry.generation
    keys = corpus.delete("space")
    assert keys == ["kv:rockets reach orbit with enough speed.", "kv:the moon circles the earth."]
    assert corpus.registry.get_document("space") is None and corpus.registry.chunks_of("space") == []
    assert all(h.doc_id == "fruit" for h in corpus.search("rockets moon", k=10))
    assert len(corpus) == 2 and corpus.registry.generation == generation + 1
    assert corpus.delete("space") is None
    consistent(corpus)


def test_delete_keeps_kv_keys_another_document_still_uses(corpus: Corpus):
    add(corpus, "copy", "the moon circles the earth.")  # same chunk text, so the same KV
    assert corpus.delete("space") == ["kv:rockets reach orbit with enough speed."]
    assert "kv:the moon circles the earth." in corpus.registry.kv_keys_in_use()


def test_document_unchanged_tracks_text_and_params(corpus: Corpus):
    doc = Document(id="fruit", text="apples and pears grow on trees.\n\nbananas grow in warm places.", source="", metadata={})
    assert corpus.document_unchanged(doc, PARAMS)
    assert not corpus.document_unchanged(doc, PARAMS + ";v2")
    assert not corpus.document_unchanged(Document("fruit", doc.text + "!", "", {}), PARAMS)
    assert not corpus.document_unchanged(Document("new", "x", "", {}), PARAMS)
    assert corpus.registry.get_document("fruit")["content_hash"] == content_hash(doc.text, PARAMS)


def test_missing_index_file_is_rebuilt_on_open(corpus: Corpus, tmp_path: Path):
    (tmp_path / INDEX_FILE).unlink()
    reopened = Corpus(tmp_path, HashEmbedder())
    assert (tmp_path / INDEX_FILE).exists() and len(reopened) == 4
    consistent(reopened)


def test_stale_index_after_a_crash_is_rebuilt_on_open(corpus: Corpus, tmp_path: Path):
    # Crash between the registry commit and the index save: the registry moves on alone.
    doc = Document(id="sea", text="whales swim in the deep ocean.", source="", metadata={})
    chunks = chunk_text(doc.id, doc.text, WS, 8)
    corpus.registry.replace_document(doc, "h", chunks, ["kv:sea"], corpus.embedder.encode([doc.text]))
    corpus.registry.delete_document("space")
    reopened = Corpus(tmp_path, HashEmbedder())
    assert reopened.search("whales ocean", k=1)[0].doc_id == "sea"
    assert {h.doc_id for h in reopened.search("rockets moon", k=10)} == {"fruit", "sea"}
    consistent(reopened)


def test_corrupt_index_file_is_rebuilt_on_open(corpus: Corpus, tmp_path: Path):
    path = tmp_path / INDEX_FILE
    path.write_bytes(path.read_bytes()[:-10])
    consistent(Corpus(tmp_path, HashEmbedder()))


def test_changing_index_kind_rebuilds_as_that_kind(corpus: Corpus, tmp_path: Path):
    reopened = Corpus(tmp_path, HashEmbedder(), index_kind="hnsw")
    assert reopened._index.kind == "hnsw"
    consistent(reopened)


def test_opening_with_another_embedder_is_refused(corpus: Corpus, tmp_path: Path):
    with pytest.raises(ValueError, match="hash-bow"):
        Corpus(tmp_path, HashEmbedder(name="other"))


def test_a_write_through_another_handle_is_seen_by_search(corpus: Corpus, tmp_path: Path):
    writer = Corpus(tmp_path, HashEmbedder())  # stands in for a separate indexer process
    add(writer, "sea", "whales swim in the deep ocean.")
    add(corpus, "sky", "clouds drift across the blue sky.")  # corpus's index lacks writer's change
    assert corpus.search("whales ocean", k=1)[0].doc_id == "sea"
    assert writer.search("clouds sky", k=1)[0].doc_id == "sky"
    for c in (corpus, writer, Corpus(tmp_path, HashEmbedder())):
        consistent(c)


def test_bulk_saves_the_index_once_at_the_end(corpus: Corpus, tmp_path: Path):
    path = tmp_path / INDEX_FILE
    before = path.stat().st_mtime_ns
    with corpus.bulk():
        add(corpus, "sea", "whales swim in the deep ocean.")
        add(corpus, "sky", "clouds drift across the blue sky.")
        assert path.stat().st_mtime_ns == before
        assert corpus.search("whales", k=1)[0].doc_id == "sea"  # searchable before the save
    assert path.stat().st_mtime_ns != before
    consistent(Corpus(tmp_path, HashEmbedder()))


def test_search_sees_the_corpus_before_or_after_an_upsert_never_between(tmp_path: Path):
    corpus = Corpus(tmp_path, HashEmbedder())
    version_text = {v: "\n\n".join(f"shared words version{v} part{i}." for i in range(4)) for v in (0, 1)}
    add(corpus, "doc", version_text[0])
    n_chunks = len(corpus.registry.chunks_of("doc"))
    stop = threading.Event()

    def writer():
        v = 0
        while not stop.is_set():
            v = 1 - v
            add(corpus, "doc", version_text[v])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            hits = corpus.search("shared words", k=8)
            versions = {h.text.split()[2] for h in hits}
            assert len(hits) == n_chunks and len(versions) == 1, hits
    finally:
        stop.set()
        thread.join()
