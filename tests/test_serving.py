"""The server on the scheduler: concurrent requests decoded together, a queued stream kept alive."""
from __future__ import annotations

import re
import threading
import time

import httpx

from tests.test_api import doc_text, index, launch


def test_concurrent_queries_are_decoded_in_one_batch_and_answer_as_alone(tmp_path):
    s = launch(tmp_path, "--max-batch", "8", "--max-tokens", "64")
    try:
        index(s.http, id="batch-doc", text=doc_text("b", 3))
        questions = [f"bridge number {i}" for i in range(6)]
        alone = {q: s.http.post("/v1/query", json={"question": q, "max_tokens": 24}).json()["answer"] for q in questions}
        got: dict[str, str] = {}

        def ask(q: str) -> None:
            with httpx.Client(base_url=s.base, timeout=60) as c:
                got[q] = c.post("/v1/query", json={"question": q, "max_tokens": 24}).json()["answer"]
        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == alone
        metrics = s.http.get("/metrics").text
        # some decode step ran more than one sequence: the histogram's "≤ 1" bucket is not all of it
        le1 = float(re.search(r'ragblend_decode_batch_size_bucket\{le="1\.0"\} (\S+)', metrics).group(1))
        total = float(re.search(r"ragblend_decode_batch_size_count (\S+)", metrics).group(1))
        assert total > le1
        assert "ragblend_sequences_running 0.0" in metrics and "ragblend_decode_kv_bytes_used 0.0" in metrics
    finally:
        s.stop()


def test_a_queued_stream_gets_its_headers_and_comments_before_the_model_is_free(tmp_path):
    s = launch(tmp_path, "--max-batch", "1", "--max-tokens", "2048")
    try:
        index(s.http, id="queued-doc", text=doc_text("q", 2))
        busy_reply: list[httpx.Response] = []
        busy = threading.Thread(target=lambda: busy_reply.append(httpx.post(f"{s.base}/v1/query", timeout=120, json={
            "question": "bridge", "max_tokens": 2000, "temperature": 1.0, "seed": 0})))
        busy.start()
        # the long one holds the only batch slot before the stream is sent (a fixed sleep raced its
        # admission on a loaded 2-core CI machine, and the stream was admitted first)
        deadline = time.monotonic() + 30
        while "ragblend_sequences_running 1.0" not in s.http.get("/metrics").text:
            assert time.monotonic() < deadline and busy.is_alive(), "the long request never started decoding"
            time.sleep(0.02)
        t0 = time.monotonic()
        lines = []
        with s.http.stream("POST", "/v1/query", json={"question": "bridge", "max_tokens": 4, "stream": True}) as r:
            assert r.status_code == 200
            headers_s = time.monotonic() - t0
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("event: done"):
                    break
        busy.join()
        assert busy_reply[0].status_code == 200, busy_reply[0].text
        assert headers_s < 1.5, headers_s  # not held back until the long request ends (~6 s)
        first_token = next(i for i, x in enumerate(lines) if x.startswith("event: token") or x.startswith("event: done"))
        assert ": queued" in lines[:first_token]
    finally:
        s.stop()
