"""The REST API end to end: real `ragblend serve` processes (uvicorn) on free loopback ports, spoken
to over HTTP, as clients would. The model is the 4-layer random `tiny-smol` (answers are
gibberish; what is tested is the serving), embeddings the hash bag-of-words test embedder."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.real  # tiny-smol speaks the bundled tokenizer

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-7f3a"
WORDS = "bridge river town engineer concrete harbour winter railway museum church".split()


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, data_dir: Path, api_key: str | None = None):
        self.proc, self.port, self.data_dir = proc, port, data_dir
        self.base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=60)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, *flags: str, api_key: str | None = None, entry: str = "tests.serve_for_tests") -> Server:
    """A real server on a free loopback port; `entry` "api.cli serve" for the product as shipped
    (with the real embedding model), the default for the cheap test embedder."""
    port, log = free_port(), tmp / "server.log"
    cmd = [sys.executable, "-m", *entry.split(), "--model", "random:tiny-smol", "--port", str(port),
           "--data-dir", str(tmp / "data"), "--log-level", "warning", *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = Server(proc, port, tmp / "data", api_key)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.base}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    pytest.fail(f"server not healthy after 90 s:\n{log.read_text()[-3000:]}")


def doc_text(tag: str, paragraphs: int, marker: str = "") -> str:
    """Paragraphs of 8-9 words (~20 tokens): one chunk each at --chunk-tokens 32."""
    return "\n\n".join(" ".join([marker, *(f"{WORDS[(j + k) % len(WORDS)]}{tag}" for k in range(8))]).strip()
                       for j in range(paragraphs))


def wait_job(http: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def index(http: httpx.Client, **doc) -> dict:
    r = http.post("/v1/documents", json=doc)
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    return job


def sse(lines) -> list[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream."""
    events, event, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Small limits so that the limits are testable: 16 KiB bodies, 64 KiB uploads, 64 tokens."""
    s = launch(tmp_path_factory.mktemp("api"), "--chunk-tokens", "32", "--max-tokens", "64",
               "--max-body-bytes", "16384", "--max-upload-bytes", "65536")
    for i in range(3):
        index(s.http, id=f"seed-{i}", text=doc_text(str(i), 2), metadata={"n": i})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """API key, a queue of one, long answers allowed: for auth, backpressure and cancellation."""
    s = launch(tmp_path_factory.mktemp("api-guarded"), "--max-queue", "1", "--max-tokens", "2048", api_key=API_KEY)
    yield s
    s.stop()


# -- answering ----------------------------------------------------------------------------------
def test_health_reports_the_model_and_the_index_size(server):
    h = server.http.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] and h["model"] == "random:tiny-smol"
    assert h["index_chunks"] >= 3 and h["queue_depth"] == 0 and h["max_queue"] == 32


def test_query_takes_the_blend_check_layer_and_deviation(server):
    r = server.http.post("/v1/query", json={"question": "Which bridge0 crosses the river0?", "top_k": 3,
                                            "mode": "blend", "ratio": 0.5, "check_layer": 0,
                                            "deviation": "key", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["recomputed_tokens"] > 0 and r.json()["selection"] == "key"


@pytest.mark.parametrize("selection", ["value", "key", "attention", "first", "hybrid", "question"])
def test_query_reports_its_selection_and_the_reused_prompt_tokens(server, selection):
    r = server.http.post("/v1/query", json={"question": "Which bridge0 crosses the river0?", "top_k": 3,
                                            "ratio": 0.25, "selection": selection, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    chunk_tokens = body["total_tokens"] - body["cached_tokens"] - body["recomputed_tokens"]
    assert body["selection"] == selection and body["ratio"] == 0.25
    assert body["recomputed_tokens"] > 0 and chunk_tokens > 0  # the question's tokens are computed
    usage = body["usage"]
    assert usage["prompt_tokens"] == body["total_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == body["cached_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_query_with_several_check_layers_at_ratio_one_answers_as_full(server):
    req = {"question": "Which bridge0 crosses the river0?", "top_k": 3, "max_tokens": 4}
    full = server.http.post("/v1/query", json={**req, "mode": "full"}).json()
    r = server.http.post("/v1/query", json={**req, "ratio": 1.0, "check_layers": [1, 2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == full["answer"] and body["ratio"] == 1.0
    assert server.http.post("/v1/query", json={**req, "check_layers": [2, 1]}).status_code == 422


@pytest.mark.parametrize("mode", ["full", "prefix", "reuse", "blend"])
def test_query_answers_with_chunks_and_timings(server, mode):
    r = server.http.post("/v1/query", json={"question": "Which bridge0 crosses the river0?", "top_k": 3,
                                            "mode": mode, "ratio": 0.3, "max_tokens": 8, "temperature": 1.0,
                                            "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str) and body["mode"] == mode
    assert len(body["chunks"]) == 3 and body["chunks"][0]["doc_id"].startswith("seed-")
    assert {"doc_id", "chunk_id", "score", "text"} <= body["chunks"][0].keys()
    t = body["timings"]
    assert all(t[k] >= 0 for k in ("retrieve_ms", "kv_load_ms", "ttft_ms", "per_token_ms", "queue_ms"))
    assert 1 <= body["completion_tokens"] <= 8 and body["total_tokens"] > 0
    assert (body["recomputed_tokens"] == 0) == (mode == "reuse")


def test_query_streams_tokens_then_a_final_event_with_timings(server):
    req = {"question": "Where is the harbour1 museum1?", "top_k": 2, "max_tokens": 12, "temperature": 1.0, "seed": 3}
    with server.http.stream("POST", "/v1/query", json={**req, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"} and len(kinds) > 1
    done = json.loads(events[-1][1])
    assert "".join(json.loads(d)["text"] for e, d in events[:-1]) == done["answer"]
    assert done["timings"]["ttft_ms"] > 0 and len(done["chunks"]) == 2
    # the same request, not streamed, samples the same answer (same seed)
    assert server.http.post("/v1/query", json=req).json()["answer"] == done["answer"]


# -- documents ----------------------------------------------------------------------------------
def test_document_lifecycle_json_and_uploads(server):
    http = server.http
    r = http.post("/v1/documents", json={"id": "notes/lifecycle", "text": doc_text("zz", 3, "okapi"),
                                         "metadata": {"lang": "en"}})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['job_id']}"
    assert r.json()["status"] in ("queued", "running", "succeeded") and r.json()["doc_ids"] == ["notes/lifecycle"]
    report = wait_job(http, r.json()["job_id"])["report"]
    assert report["chunks"] >= 1
    # the data dir, filled through the API only, records no --neighbours: the default applies to it
    # as to `ragblend index` (api.datadir.DEFAULT_NEIGHBOURS), and the upload's chunks get theirs
    from api.datadir import DEFAULT_NEIGHBOURS
    from api.neighbour_index import recorded

    assert DEFAULT_NEIGHBOURS >= 1 and report["neighbour_chunks"] >= report["chunks"]
    assert report["neighbour_kv_computed"] >= report["chunks"]
    assert len(recorded(server.data_dir)) >= report["chunks"]

    up = http.post("/v1/documents", files={"file": ("notes.md", "# Notes\n\nThe okapi lives in the forest.".encode())})
    assert up.status_code == 202
    md_id = up.json()["doc_ids"][0]  # no id given: the file's name
    assert md_id == "notes.md"
    lines = "\n".join(json.dumps(x) for x in [{"id": "jl-1", "text": "okapi one", "title": "A"},
                                              {"id": "jl-2", "text": "okapi two"}])
    jl = http.post("/v1/documents", files={"file": ("batch.jsonl", lines.encode(), "application/x-ndjson")})
    assert jl.status_code == 202 and jl.json()["doc_ids"] == ["jl-1", "jl-2"]
    for job in (up, jl):
        assert wait_job(http, job.json()["job_id"])["status"] == "succeeded"

    listed = {d["doc_id"]: d for d in http.get("/v1/documents", params={"limit": 1000}).json()["documents"]}
    assert {"notes/lifecycle", md_id, "jl-1", "jl-2"} <= listed.keys()
    assert listed["jl-1"]["metadata"] == {"title": "A", "filename": "batch.jsonl"}
    one = http.get("/v1/documents/notes/lifecycle").json()
    assert one["metadata"] == {"lang": "en"} and one["n_chunks"] == len(one["chunks"]) >= 2

    def docs_seen() -> set[str]:
        r = http.post("/v1/query", json={"question": "okapi", "top_k": 32, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return {c["doc_id"] for c in r.json()["chunks"]}

    assert {"notes/lifecycle", md_id, "jl-1"} <= docs_seen()
    assert http.delete("/v1/documents/notes/lifecycle").json() == {"doc_id": "notes/lifecycle", "deleted": True}
    assert http.get("/v1/documents/notes/lifecycle").status_code == 404
    assert http.delete("/v1/documents/notes/lifecycle").status_code == 404
    assert "notes/lifecycle" not in docs_seen()
    for doc_id in (md_id, "jl-1", "jl-2"):
        assert http.delete(f"/v1/documents/{doc_id}").status_code == 200


def test_indexing_while_querying_shows_each_document_whole_or_not_at_all(server):
    """Writers commit a document at once: a query's retrieved chunks, and a GET of the document,
    hold all of its chunks or none (or all of the replacement's), never a part."""
    http = server.http
    base_chunks = http.get("/health").json()["index_chunks"]
    docs = {f"atomic-{i}": doc_text(f"a{i}", 4, "quokka") for i in range(3)}
    replacement = doc_text("a9", 2, "quokka")
    seen: dict[str, set[int]] = {d: set() for d in docs}
    final_counts: dict[str, set[int]] = {}
    problems: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
            writing = True

            async def writer() -> None:
                nonlocal writing
                for doc_id, text in docs.items():
                    r = await client.post("/v1/documents", json={"id": doc_id, "text": text})
                    assert r.status_code == 202
                    while (await client.get(f"/v1/jobs/{r.json()['job_id']}")).json()["status"] in ("queued", "running"):
                        await asyncio.sleep(0.02)
                    final_counts[doc_id] = {(await client.get(f"/v1/documents/{doc_id}")).json()["n_chunks"]}
                r = await client.post("/v1/documents", json={"id": "atomic-0", "text": replacement})
                assert (await client.delete("/v1/documents/atomic-1")).status_code == 200
                while (await client.get(f"/v1/jobs/{r.json()['job_id']}")).json()["status"] in ("queued", "running"):
                    await asyncio.sleep(0.02)
                final_counts["atomic-0"].add((await client.get("/v1/documents/atomic-0")).json()["n_chunks"])
                writing = False

            async def querier() -> None:
                while writing:
                    r = await client.post("/v1/query", json={"question": "quokka", "top_k": 32, "max_tokens": 1})
                    if r.status_code != 200:
                        problems.append(f"query {r.status_code}: {r.text}")
                        continue
                    chunks = r.json()["chunks"]
                    if len(chunks) == 32:
                        problems.append("the corpus outgrew top_k: the test cannot see every chunk")
                    for d in docs:
                        seen[d].add(sum(c["doc_id"] == d for c in chunks))

            async def reader() -> None:
                while writing:
                    for d in docs:
                        r = await client.get(f"/v1/documents/{d}")
                        if r.status_code == 200:
                            body = r.json()
                            if body["n_chunks"] != len(body["chunks"]):
                                problems.append(f"{d}: row says {body['n_chunks']} chunks, {len(body['chunks'])} listed")
                            seen[d].add(len(body["chunks"]))
                        elif r.status_code != 404:
                            problems.append(f"GET {d} {r.status_code}: {r.text}")
                    await asyncio.sleep(0.01)

            await asyncio.gather(writer(), querier(), querier(), reader())

    assert base_chunks + 12 < 32
    asyncio.run(run())
    assert not problems, problems[:5]
    for d in docs:
        assert max(final_counts[d]) >= 2
        assert seen[d] <= {0} | final_counts[d], (d, seen[d], final_counts[d])
    assert any(seen[d] - {0} for d in docs), "no query ever saw an indexed document"
    for d in ("atomic-0", "atomic-2"):
        assert http.delete(f"/v1/documents/{d}").status_code == 200


def test_a_chunk_kv_missing_at_query_time_is_recomputed_not_a_deadlock(server):
    """The worker holds the model while the KV source recomputes a lost chunk KV (here deleted
    behind the server's back, as a concurrent DELETE would after retrieval); that must not hang.
    Every entry the query could read goes: the plain ones and their neighbour-aware variants."""
    from api.neighbour_index import recorded
    from retrieval.registry import Registry
    from store import KVStore

    index(server.http, id="lost-kv", text=doc_text("lost", 1, "wombat"))
    data = server.data_dir
    keys = [c["kv_key"] for c in Registry(data / "corpus" / "registry.sqlite").chunks_of("lost-kv")]
    table = recorded(data)
    keys += [table[k]["key"] for k in keys if k in table]
    store = KVStore(data / "kv")
    assert store.delete_many(keys) == len(keys) >= 1
    store.close()
    try:
        r = server.http.post("/v1/query", json={"question": "wombat", "top_k": 32, "max_tokens": 2}, timeout=20)
        assert r.status_code == 200 and "lost-kv" in {c["doc_id"] for c in r.json()["chunks"]}
        assert "ragblend_kv_recomputed_total 0.0" not in server.http.get("/metrics").text
    finally:
        server.http.delete("/v1/documents/lost-kv")


def test_ask_and_the_rest_api_run_the_same_query_path(tmp_path):
    """The same question through `ragblend ask --json` and `POST /v1/query` on one data dir (the
    product as shipped: real embedder, real server): the same chunks, answer and recomputation."""
    data = tmp_path / "data"
    cli = [sys.executable, "-m", "api.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    model = ["--model", "random:tiny-smol"]
    done = subprocess.run([*cli, "index", str(ROOT / "samples" / "corpus"), "--data-dir", str(data),
                           "--chunk-tokens", "64", *model], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    question, settings = "Who designed the Halvard Bridge?", {"top_k": 3, "ratio": 0.3, "max_tokens": 8}
    asked = subprocess.run([*cli, "ask", question, "--data-dir", str(data), "--json", "--top-k", "3",
                            "--ratio", "0.3", "--max-tokens", "8", *model], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr
    by_cli = json.loads(asked.stdout)
    server = launch(tmp_path, entry="api.cli serve")
    try:
        r = server.http.post("/v1/query", json={"question": question, **settings})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    by_rest = r.json()
    assert [c["chunk_id"] for c in by_rest["chunks"]] == [c["chunk_id"] for c in by_cli["chunks"]]
    assert by_rest["answer"] == by_cli["answer"] and by_rest["completion_tokens"] > 0
    for field in ("recomputed_tokens", "cached_tokens", "total_tokens", "selection", "ratio"):
        assert by_rest[field] == by_cli[field], field
    assert by_cli["recomputed_tokens"] > 0


# -- OpenAI compatibility -----------------------------------------------------------------------
def test_openai_client_lists_models_and_chats_streaming_and_not(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["random:tiny-smol"]
    ask = dict(model="random:tiny-smol", max_tokens=10, temperature=0,
               messages=[{"role": "system", "content": "ignored"},
                         {"role": "user", "content": "Which town has a railway2?"}],
               extra_body={"mode": "reuse", "top_k": 2})
    done = client.chat.completions.create(**ask)
    assert done.object == "chat.completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 10 and done.usage.prompt_tokens > 0
    extras = done.model_extra["ragblend"]
    assert extras["mode"] == "reuse" and len(extras["chunks"]) == 2 and extras["recomputed_tokens"] == 0
    # reuse computes only the question: every other prompt token's KV came from the cache
    cached = done.usage.prompt_tokens_details.cached_tokens
    assert cached == extras["cached_tokens"] and 0 < cached < done.usage.prompt_tokens

    stream = client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == done.choices[0].message.content  # greedy: streamed and blocking answers agree
    assert finishes == [done.choices[0].finish_reason] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached

    blended = client.chat.completions.create(**{**ask, "extra_body": {"top_k": 2, "selection": "attention",
                                                                      "ratio": 0.5}})
    assert blended.model_extra["ragblend"]["selection"] == "attention"
    assert 0 < blended.usage.prompt_tokens_details.cached_tokens < cached

    with pytest.raises(openai.UnprocessableEntityError, match="no user message"):
        client.chat.completions.create(model="random:tiny-smol", messages=[{"role": "system", "content": "hi"}])


# -- auth, backpressure, cancellation (the guarded server) -------------------------------------------
def test_api_key_is_required_everywhere_but_health(guarded):
    bare = httpx.Client(base_url=guarded.base, timeout=30)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/documents"), ("POST", "/v1/query"), ("GET", "/metrics"),
                             ("GET", "/v1/models")):
            r = bare.request(method, path, headers=headers, json={"question": "x"} if method == "POST" else None)
            assert r.status_code == 401 and "API key" in r.json()["detail"], (headers, path)
            assert r.headers["www-authenticate"] == "Bearer"
    assert bare.get("/health").status_code == 200 and bare.get("/openapi.json").status_code == 200
    assert guarded.http.get("/v1/documents").status_code == 200
    # with the key, a query on the empty index says so
    r = guarded.http.post("/v1/query", json={"question": "anything"})
    assert r.status_code == 409 and "index is empty" in r.json()["detail"]

    import openai
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.base}/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=f"{guarded.base}/v1", api_key=API_KEY).models.list().data[0].id


def test_full_queue_is_refused_with_retry_after(guarded):
    index(guarded.http, id="queue-doc", text=doc_text("q", 2))

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.base, headers=guarded.http.headers, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/query", json={
                "question": "bridge", "max_tokens": 400, "temperature": 1.0, "seed": i}) for i in range(6)))

    try:
        responses = asyncio.run(fire())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 3, codes
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
        assert guarded.http.get("/health").json()["queue_depth"] == 0
        metrics = guarded.http.get("/metrics").text
        assert f'ragblend_queue_rejections_total{{queue="query"}} {codes.count(503)}.0' in metrics
        assert 'ragblend_http_requests_total{method="POST",route="/v1/query",status="503"}' in metrics
    finally:
        guarded.http.delete("/v1/documents/queue-doc")


def test_a_client_that_disconnects_stops_its_generation(guarded):
    index(guarded.http, id="cancel-doc", text=doc_text("c", 2))
    try:
        t0 = time.monotonic()
        with guarded.http.stream("POST", "/v1/query", json={
                "question": "bridge", "max_tokens": 2000, "temperature": 1.0, "seed": 0, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break  # leaving the block closes the connection mid-answer
        # 2000 tokens take ~6 s; the worker drops them at the next token and serves the next query
        r = guarded.http.post("/v1/query", json={"question": "bridge", "max_tokens": 1})
        assert r.status_code == 200
        elapsed = time.monotonic() - t0
        # counted only when the worker stops a generation before its end
        assert "ragblend_generations_cancelled_total 1.0" in guarded.http.get("/metrics").text
        assert elapsed < 5.0
    finally:
        guarded.http.delete("/v1/documents/cancel-doc")


# -- bad requests -------------------------------------------------------------------------------
def _chunked(n: int = 8):  # 32 KiB, no Content-Length
    for _ in range(n):
        yield b"x" * 4096


def _q(**fields) -> dict:
    return {"json": {"question": "bridge", **fields}}


BAD_REQUESTS = [
    # (name, method, path, httpx kwargs, status, fragment of the message)
    ("empty question", "POST", "/v1/query", {"json": {"question": ""}}, 422, "question"),
    ("blank question", "POST", "/v1/query", {"json": {"question": "  \n "}}, 422, "question"),
    ("missing question", "POST", "/v1/query", {"json": {"top_k": 3}}, 422, "question: Field required"),
    ("top_k zero", "POST", "/v1/query", _q(top_k=0), 422, "top_k"),
    ("top_k above 32", "POST", "/v1/query", _q(top_k=33), 422, "top_k"),
    ("top_k a string", "POST", "/v1/query", _q(top_k="3"), 422, "top_k"),
    ("ratio above 1", "POST", "/v1/query", _q(ratio=1.5), 422, "ratio"),
    ("negative ratio", "POST", "/v1/query", _q(ratio=-0.1), 422, "ratio"),
    ("unknown deviation", "POST", "/v1/query", _q(deviation="values"), 422, "deviation"),
    ("retired deviation both", "POST", "/v1/query", _q(deviation="both"), 422, "deviation"),
    ("unknown selection", "POST", "/v1/query", _q(selection="random"), 422, "selection"),
    ("selection and deviation", "POST", "/v1/query", _q(selection="key", deviation="value"), 422, "not both"),
    ("check layers out of order", "POST", "/v1/query", _q(check_layers=[3, 1]), 422, "check_layers"),
    ("later check layer past the model", "POST", "/v1/query", _q(check_layers=[1, 4]), 422, "check_layers"),
    ("check layer past the model", "POST", "/v1/query", _q(check_layer=4), 422, "check_layer"),
    ("unknown mode", "POST", "/v1/query", _q(mode="turbo"), 422, "mode"),
    ("max_tokens zero", "POST", "/v1/query", _q(max_tokens=0), 422, "max_tokens"),
    ("max_tokens over the cap", "POST", "/v1/query", _q(max_tokens=65), 422, "at most 64"),
    ("temperature above 2", "POST", "/v1/query", _q(temperature=2.5), 422, "temperature"),
    ("misspelt field", "POST", "/v1/query", _q(topk=3), 422, "topk: Extra inputs"),
    ("malformed JSON", "POST", "/v1/query", {"content": b'{"question": ', "headers": {"content-type": "application/json"}},
     422, "invalid JSON"),
    ("JSON array", "POST", "/v1/query", {"json": ["bridge"]}, 422, "JSON object"),
    ("question over the token limit", "POST", "/v1/query", _q(question="bridge " * 1500), 422, "tokens long"),
    ("body over the limit", "POST", "/v1/query", _q(question="x" * 20_000), 413, "too large"),
    ("chunked body over the limit", "POST", "/v1/query",
     {"content": _chunked, "headers": {"content-type": "application/json"}}, 413, "too large"),
    ("unknown document", "GET", "/v1/documents/no-such-doc", {}, 404, "no document"),
    ("delete unknown document", "DELETE", "/v1/documents/no/such/doc", {}, 404, "no document"),
    ("unknown job", "GET", "/v1/jobs/123abc", {}, 404, "no job"),
    ("page size zero", "GET", "/v1/documents?limit=0", {}, 422, "limit"),
    ("empty document", "POST", "/v1/documents", {"json": {"text": ""}}, 422, "text"),
    ("blank document", "POST", "/v1/documents", {"json": {"text": "  \n\n "}}, 422, "blank"),
    ("id with a newline", "POST", "/v1/documents", {"json": {"id": "a\nb", "text": "x"}}, 422, "control characters"),
    ("id too long", "POST", "/v1/documents", {"json": {"id": "x" * 300, "text": "x"}}, 422, "id"),
    ("metadata not an object", "POST", "/v1/documents", {"json": {"text": "x", "metadata": [1]}}, 422, "metadata"),
    ("document as a form", "POST", "/v1/documents", {"data": {"text": "x"}}, 415, "multipart/form-data"),
    ("upload of an image", "POST", "/v1/documents", {"files": {"file": ("a.png", b"\x89PNG\r\n")}}, 415,
     "unsupported binary format"),
    ("upload binary", "POST", "/v1/documents", {"files": {"file": ("a.md", b"ab\x00\x01")}}, 400, "binary"),
    ("upload of a broken pdf", "POST", "/v1/documents", {"files": {"file": ("a.pdf", b"%PDF-1.4")}}, 400,
     "not a readable PDF"),
    ("upload over the limit", "POST", "/v1/documents", {"files": {"file": ("a.txt", b"a" * 70_000)}}, 413, "too large"),
    ("jsonl with a bad line", "POST", "/v1/documents",
     {"files": {"file": ("a.jsonl", b'{"text": "ok"}\n{"text": \n')}}, 400, "line 2"),
    ("jsonl line without text", "POST", "/v1/documents", {"files": {"file": ("a.jsonl", b'{"id": "x"}\n')}}, 422, "line 1"),
    ("upload without a file field", "POST", "/v1/documents", {"files": {"doc": ("a.txt", b"hello")}}, 422, "`file`"),
    ("chat without messages", "POST", "/v1/chat/completions", {"json": {"messages": []}}, 422, "messages"),
    ("chat without a user message", "POST", "/v1/chat/completions",
     {"json": {"messages": [{"role": "assistant", "content": "hi"}]}}, 422, "no user message"),
    ("chat asking for n=2", "POST", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "hi"}], "n": 2}}, 400, "n:"),
    ("chat with a bad mode", "POST", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "hi"}], "mode": "fast"}}, 422, "mode"),
    ("unknown route", "GET", "/v1/nothing-here", {}, 404, "no route"),
    ("wrong method", "PUT", "/v1/query", {}, 405, "not allowed"),
]


@pytest.mark.parametrize("method,path,kwargs,status,fragment", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_a_4xx_that_says_what_is_wrong(server, method, path, kwargs, status, fragment):
    kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}
    r = server.http.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert fragment in detail, detail
    if path.startswith("/v1/chat/"):
        assert r.json()["error"]["message"] == detail  # the OpenAI error shape as well
    assert server.http.get("/health").json()["status"] == "ok"


def test_metrics_count_requests_tokens_and_the_hot_tier(server):
    text = server.http.get("/metrics").text
    assert 'ragblend_http_requests_total{method="POST",route="/v1/query",status="200"}' in text
    assert 'route="/v1/documents/{doc_id}",status="404"' in text  # templates, not raw paths
    for name in ("ragblend_ttft_seconds_bucket", "ragblend_http_request_duration_seconds_bucket",
                 "ragblend_tokens_generated_total", "ragblend_hot_tier_hits_total", "ragblend_hot_tier_misses_total",
                 "ragblend_queue_depth", 'ragblend_prompt_tokens_total{kv="reused"}',
                 'ragblend_prompt_tokens_total{kv="computed"}'):
        assert name in text, name


def test_openapi_documents_every_route_with_a_summary(server):
    spec = server.http.get("/openapi.json").json()
    ops = [(m, p, op) for p, item in spec["paths"].items() for m, op in item.items()]
    assert {p for _, p, _ in ops} >= {"/v1/query", "/v1/documents", "/v1/documents/{doc_id}", "/v1/jobs/{job_id}",
                                      "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
    assert all(op.get("summary") for _, _, op in ops)
