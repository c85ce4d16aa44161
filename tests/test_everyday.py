"""Everyday use (issue 16): real document formats, every file accounted for, an index that stays
in sync with its folders and keeps its settings. The real `ragblend` command (tests/cli_for_tests.py:
the hash test embedder) on files of each format made on the spot (tests/docfiles.py)."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from retrieval.formats import Unreadable, decode, extract
from retrieval.loaders import collect_skips, load_path
from tests.conftest import run_cli
from tests.docfiles import FACTS, mixed_folder, pdf_bytes
from tests.test_hardening import TINY, cli, documents


def chunk_texts(data: Path) -> dict[str, str]:
    db = sqlite3.connect(data / "corpus" / "registry.sqlite")
    try:
        rows = db.execute("SELECT doc_id, text FROM chunks ORDER BY doc_id, idx").fetchall()
    finally:
        db.close()
    out: dict[str, str] = {}
    for doc_id, text in rows:
        out[doc_id] = (out.get(doc_id, "") + " " + text).strip()
    return out


# -- the formats, without a model ------------------------------------------------------------------
def test_each_format_yields_its_text_without_markup(tmp_path):
    folder = mixed_folder(tmp_path / "mixed")
    for name, fact in FACTS.items():
        got = extract(folder / name)
        assert fact in " ".join(got.text.split()), (name, got.text)
    html = extract(folder / "museum.html").text
    assert "hidden" not in html and "color" not in html and html.startswith("Museum")
    rst = extract(folder / "winter.rst").text
    assert "*" not in rst and "``" not in rst and "root:" not in rst  # markup gone, no file included
    assert "crane | 40 t" in extract(folder / "harbour.docx").text  # table rows kept as text
    assert extract(folder / "latin1.txt").encoding == "cp1252"


def test_encodings_are_detected_and_binary_is_refused_with_a_reason():
    text = "Grüße aus München, où l'on mange à côté du théâtre."
    assert decode(text.encode("utf-8")) == (text, "utf-8")
    assert decode(text.encode("utf-16")) == (text, "utf-16-le")  # BOM
    assert decode(text.encode("cp1252"))[0] == text
    assert decode("Привет, как дела? Это проверка кодировки текста на русском языке.".encode("cp1251"))[0].startswith("Привет")
    with pytest.raises(Unreadable, match="NUL"):
        decode(b"PK\x03\x04\x00\x00binary")


def test_unreadable_files_are_collected_with_their_reasons(tmp_path):
    (tmp_path / "scan.pdf").write_bytes(pdf_bytes([]))  # a page without text: a scanned PDF, to us
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "ok.md").write_text("fine")
    with collect_skips() as skipped:
        docs = list(load_path(tmp_path))
    assert [d.id for d in docs] == ["ok.md"]
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert set(reasons) == {"scan.pdf", "broken.pdf", "photo.jpg", "empty.txt"}
    assert "scanned" in reasons["scan.pdf"] and "not a readable PDF" in reasons["broken.pdf"]
    assert "binary format '.jpg'" in reasons["photo.jpg"] and "no text" in reasons["empty.txt"]


# -- the command -----------------------------------------------------------------------------------
@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_folder_of_pdf_html_docx_rst_readme_and_latin1_indexes_every_file(tmp_path):
    folder = mixed_folder(tmp_path / "mixed")
    data = tmp_path / "data"
    r = cli("index", str(folder), "--data-dir", str(data), "--chunk-tokens", "64", "--json", *TINY)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["documents"] == len(FACTS)
    assert [(Path(s["path"]).name, s["reason"]) for s in summary["skipped"]] == [
        ("logo.png", "unsupported binary format '.png'")]
    texts = chunk_texts(data)
    assert set(texts) == {f"mixed/{name}" for name in FACTS}
    for name, fact in FACTS.items():
        assert fact in " ".join(texts[f"mixed/{name}"].split()), name
    # the human summary lists the skipped file with its reason too
    r = cli("index", str(folder), "--data-dir", str(data), *TINY)
    assert r.returncode == 0, r.stderr
    assert "6 documents (6 unchanged)" in r.stdout and "logo.png: unsupported binary format '.png'" in r.stdout


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_folder_with_nothing_readable_exits_2_listing_every_skip(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "logo.png").write_bytes(b"\x89PNG")
    (folder / "blob.txt").write_bytes(b"abc\x00\x01\x02")
    r = run_cli("index", str(folder), "--data-dir", str(tmp_path / "d"), "--json", *TINY)  # no model work
    assert r.returncode == 2 and "no documents" in r.stderr, r.stderr
    summary = json.loads(r.stdout)
    assert summary["documents"] == 0
    assert {Path(s["path"]).name: s["reason"] for s in summary["skipped"]} == {
        "logo.png": "unsupported binary format '.png'", "blob.txt": "binary (contains NUL bytes)"}
    r = run_cli("index", str(folder), "--data-dir", str(tmp_path / "d"), *TINY)
    assert r.returncode == 2 and "blob.txt: binary (contains NUL bytes)" in r.stdout, r.stdout
    assert not (tmp_path / "d").exists()


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_two_roots_with_the_same_relative_file_names_keep_both(tmp_path):
    for name in ("a", "b"):
        mixed_folder(tmp_path / name / "docs")
    data = tmp_path / "data"
    r = cli("index", str(tmp_path / "a" / "docs"), str(tmp_path / "b" / "docs"), "--data-dir", str(data),
            "--chunk-tokens", "64", "--json", *TINY)
    assert r.returncode == 0, r.stderr
    ids = set(documents(data))
    assert ids == {f"{root}/docs/{name}" for root in ("a", "b") for name in FACTS}


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_reindex_drops_documents_whose_files_or_lines_are_gone(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "keep.md").write_text("The okapi lives in the forest.")
    (folder / "sub" / "gone.txt").write_text("The heron fishes in the river.")
    (folder / "lines.jsonl").write_text(json.dumps({"id": "l1", "text": "one line"}) + "\n"
                                        + json.dumps({"id": "l2", "text": "two lines"}) + "\n")
    data = tmp_path / "data"
    assert cli("index", str(folder), "--data-dir", str(data), "--chunk-tokens", "32", *TINY).returncode == 0
    assert set(documents(data)) == {"notes/keep.md", "notes/sub/gone.txt", "l1", "l2"}

    (folder / "sub" / "gone.txt").unlink()
    (folder / "lines.jsonl").write_text(json.dumps({"id": "l1", "text": "one line"}) + "\n")
    r = cli("index", str(folder), "--data-dir", str(data), "--keep-missing", "--json", *TINY)
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] == [], r.stderr
    assert len(documents(data)) == 4  # --keep-missing keeps them

    r = cli("index", str(folder), "--data-dir", str(data), "--json", *TINY)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["removed"]) == ["l2", "notes/sub/gone.txt"]
    assert set(documents(data)) == {"notes/keep.md", "l1"}
    texts = " ".join(chunk_texts(data).values())
    assert "heron" not in texts and "two lines" not in texts  # no longer searchable


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_reindex_with_other_chunk_tokens_is_refused_without_rechunk(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.md").write_text("\n\n".join(f"Paragraph {i} speaks of bridges and rivers and towns." for i in range(12)))
    data = tmp_path / "data"
    assert cli("index", str(folder), "--data-dir", str(data), "--chunk-tokens", "32", *TINY).returncode == 0
    assert json.loads((data / "index.json").read_text())["chunk_tokens"] == 32
    chunks = documents(data)["notes/a.md"]["n_chunks"]

    r = cli("index", str(folder), "--data-dir", str(data), "--json", *TINY)  # the flag forgotten: 32 reused
    assert r.returncode == 0 and json.loads(r.stdout)["unchanged"] == 1, r.stderr

    r = cli("index", str(folder), "--data-dir", str(data), "--chunk-tokens", "128", *TINY)
    assert r.returncode == 2, r.stderr
    assert "--chunk-tokens 32, not 128" in r.stderr and "--rechunk" in r.stderr
    assert documents(data)["notes/a.md"]["n_chunks"] == chunks  # nothing changed

    r = cli("index", str(folder), "--data-dir", str(data), "--chunk-tokens", "128", "--rechunk", "--json", *TINY)
    assert r.returncode == 0 and json.loads(r.stdout)["unchanged"] == 0, r.stderr
    assert json.loads((data / "index.json").read_text())["chunk_tokens"] == 128
    assert documents(data)["notes/a.md"]["n_chunks"] < chunks


@pytest.mark.real  # random:tiny-smol speaks the bundled tokenizer
def test_ask_lists_its_sources_under_the_answer(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "okapi.md").write_text("The okapi lives in the forest of the Congo.")
    (folder / "heron.txt").write_text("The heron fishes in the river at dawn.")
    data = tmp_path / "data"
    assert cli("index", str(folder), "--data-dir", str(data), "--chunk-tokens", "32", *TINY).returncode == 0
    r = cli("ask", "Where does the okapi live?", "--data-dir", str(data), "--top-k", "2", "--max-tokens", "3", *TINY)
    assert r.returncode == 0, r.stderr
    answer, sources = r.stdout.split("sources:\n")
    lines = [x for x in sources.rstrip().splitlines() if x.startswith("  [")]
    passages = [x.strip() for x in sources.rstrip().splitlines() if x.startswith("      ")]
    assert len(lines) == 2 and lines[0].startswith("  [1] notes/okapi.md  chunk 1/1")  # best first
    assert all(re.search(r"chunk 1/1  score -?\d\.\d{4}$", line) for line in lines), lines
    assert {line.split()[1] for line in lines} == {"notes/okapi.md", "notes/heron.txt"}
    assert passages[0] == "The okapi lives in the forest of the Congo."  # each source shows its passage


def test_a_missing_local_model_path_is_reported_as_such(tmp_path):
    (tmp_path / "a.md").write_text("text")
    r = run_cli("index", str(tmp_path / "a.md"), "--data-dir", str(tmp_path / "d"), "--model", str(tmp_path / "no-model"))
    assert r.returncode == 2 and f"--model {tmp_path / 'no-model'}: no such file or directory" in r.stderr, r.stderr
    r = run_cli("index", str(tmp_path / "a.md"), "--data-dir", str(tmp_path / "d"), "--model", "nobody-org/no-such-model")
    assert r.returncode == 2 and "local Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE=0" in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()
