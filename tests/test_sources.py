"""Everyday use through the API (issue 24), against a real server: every format the CLI reads
uploaded and searchable under its file name, the relevance floor's "not covered" answer without a
model call, filters and word search per request, and sources that cite passage, chunk k of n and
PDF page."""
from __future__ import annotations

import json

import pytest

from api.answering import NOT_COVERED
from tests.docfiles import FACTS, mixed_folder, pdf_pages_bytes
from tests.test_api import index, launch, sse, wait_job

pytestmark = pytest.mark.real  # tiny-smol speaks the bundled tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = launch(tmp_path_factory.mktemp("sources"), "--chunk-tokens", "48", "--max-tokens", "16")
    index(s.http, id="seed", text="The seed document mentions nothing else.")
    yield s
    s.stop()


def upload(http, name: str, data: bytes, **form) -> str:
    r = http.post("/v1/documents", files={"file": (name, data)}, data=form)
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    return r.json()["doc_ids"][0]


def ask(http, question: str, **body) -> dict:
    r = http.post("/v1/query", json={"question": question, "max_tokens": 4, "mode": "full", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_every_format_the_cli_reads_is_uploaded_searchable_under_its_file_name(server, tmp_path):
    folder = mixed_folder(tmp_path / "mixed")
    for name in ("report.pdf", "harbour.docx", "museum.html", "winter.rst", "README", "latin1.txt"):
        assert upload(server.http, name, (folder / name).read_bytes()) == name
        chunks = ask(server.http, FACTS[name], filter={"doc_id": name}, top_k=8)["chunks"]
        words = [w for w in FACTS[name].rstrip(".").split() if len(w) > 4]
        assert chunks and all(w in " ".join(c["text"] for c in chunks) for w in words), (name, chunks)
    listed = {d["doc_id"] for d in server.http.get("/v1/documents", params={"limit": 100}).json()["documents"]}
    assert {"report.pdf", "harbour.docx", "museum.html", "winter.rst"} <= listed
    r = server.http.post("/v1/documents", files={"file": ("logo.png", (folder / "logo.png").read_bytes())})
    assert r.status_code == 415 and "unsupported binary format" in r.json()["detail"]


def test_min_score_over_every_score_answers_not_covered_without_the_model(server):
    body = {"min_score": 0.999, "top_k": 4}
    done = ask(server.http, "What is the capital of Australia?", **body)
    assert not done["covered"] and done["chunks"] == [] and done["answer"].startswith(NOT_COVERED)
    assert done["completion_tokens"] == 0 and "0.999" in done["answer"]
    with server.http.stream("POST", "/v1/query", json={"question": "capital of Australia?", "stream": True,
                                                        **body}) as r:
        events = sse(r.iter_lines())
    assert [e for e, _ in events] == ["token", "done"] and json.loads(events[1][1])["covered"] is False
    chat = server.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "capital of Australia?"}], **body}).json()
    assert chat["choices"][0]["message"]["content"].startswith(NOT_COVERED) and chat["ragblend"]["covered"] is False
    assert ask(server.http, "seed document", min_score=-1.0)["covered"]


def test_filters_and_word_search_apply_per_request(server):
    for tag in ("a", "b"):
        index(server.http, id=f"team-{tag}/faq", text=f"Team {tag} answers tickets tagged ZX-{tag}9.",
              metadata={"team": tag})
    both = {c["doc_id"] for c in ask(server.http, "tickets", top_k=32)["chunks"]}
    assert {"team-a/faq", "team-b/faq"} <= both
    for flt, want in (({"doc_prefix": "team-a/"}, {"team-a/faq"}), ({"metadata": {"team": "b"}}, {"team-b/faq"}),
                      ({"doc_id": ["team-a/faq", "seed"]}, {"team-a/faq", "seed"}),
                      ({"source": "api"}, None)):
        got = {c["doc_id"] for c in ask(server.http, "tickets", top_k=32, filter=flt)["chunks"]}
        assert got == want if want is not None else got >= {"team-a/faq", "team-b/faq"}, (flt, got)
    words = ask(server.http, "ZX-b9", top_k=1, retrieval="bm25")["chunks"]
    assert words[0]["doc_id"] == "team-b/faq"
    assert ask(server.http, "ZX-b9", top_k=2, retrieval="hybrid")["chunks"]
    oa = server.http.post("/v1/completions", json={"prompt": "tickets", "max_tokens": 2, "top_k": 32,
                                                    "filter": {"metadata": {"team": "a"}}}).json()
    assert {c["doc_id"] for c in oa["ragblend"]["chunks"]} == {"team-a/faq"}
    bad = server.http.post("/v1/query", json={"question": "x", "filter": {"metadata": {"bad key": 1}}})
    assert bad.status_code == 422 and "metadata key" in bad.json()["detail"]
    assert server.http.post("/v1/query", json={"question": "x", "rerank": True}).status_code == 422


def test_sources_carry_the_passage_its_chunk_number_and_its_pdf_page(server):
    # each page ~30 tokens: one chunk each at --chunk-tokens 48
    pages = [["Fleet Manual", f"Section {w}: the {w} pump needs oil every {n} days, and its filter is",
              f"checked by the crew of the {w} deck each month.", f"Page {i} of 3"]
             for i, (w, n) in enumerate((("alpha", 3), ("bravo", 5), ("charlie", 7)), 1)]
    doc = upload(server.http, "fleet.pdf", pdf_pages_bytes(pages))
    chunks = ask(server.http, "charlie pump oil", filter={"doc_id": doc}, top_k=8)["chunks"]
    n = chunks[0]["doc_chunks"]
    assert n >= 1 and {c["chunk"] for c in chunks} <= set(range(1, n + 1))
    assert n == 3 and {c["page"] for c in chunks} == {1, 2, 3}
    for c in chunks:
        assert ("alpha", "bravo", "charlie")[c["page"] - 1] in c["text"] and c["chunk"] == c["page"]
    assert all("Fleet Manual" not in c["text"] and "Page" not in c["text"] for c in chunks)


def test_queue_time_ends_when_the_scheduler_takes_the_request(server):
    """On an idle server a request barely waits: its KV load and prefill are TTFT's, not queue's."""
    index(server.http, id="long", text=" ".join(f"word{i}" for i in range(400)))
    t = ask(server.http, "word7 word9", filter={"doc_id": "long"}, top_k=8)["timings"]
    assert t["queue_ms"] < t["kv_load_ms"] + t["prefill_ms"], t


def test_the_servers_min_score_applies_unless_the_request_gives_its_own():
    from api.schemas import QueryRequest

    assert QueryRequest(question="q").search_options(0.3).min_score == 0.3
    assert QueryRequest(question="q", min_score=0.1).search_options(0.3).min_score == 0.1
    assert QueryRequest(question="q").search_options(None).min_score is None
