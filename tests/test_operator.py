"""The operator's kit (issue 24 item 6): a config file that flags override, named API keys that a
key file revokes, JSON logs and a response header with the request id, the served model name,
`--version`/`-h`, a taken port refused before the model loads, and a data dir inside the corpus
left out."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from api.config_file import ConfigError, options_for, read_config
from api.keys import KeyFileError, parse_keys
from tests.test_api import launch
from tests.test_hardening import ENV, ROOT, TINY, cli, documents

pytestmark = pytest.mark.real  # tiny-smol speaks the bundled tokenizer


def test_config_file_values_are_defaults_that_flags_override(tmp_path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The harbour crane lifts forty tonnes.\n\nThe quay is long.")
    data = tmp_path / "data"
    (tmp_path / "index.toml").write_text(f'[index]\nchunk-tokens = 16\ndata_dir = "{data}"\nmodel = "random:tiny-smol"\n'
                                         'index-kind = "hnsw"\n[serve]\nport = 1\n')
    r = cli("index", str(corpus), "--config", str(tmp_path / "index.toml"), "--index-kind", "flat", "--json")
    assert r.returncode == 0, r.stderr
    recorded = json.loads((data / "index.json").read_text())
    assert recorded["chunk_tokens"] == 16  # from the file
    from retrieval.index import VectorIndex

    assert VectorIndex.load(data / "corpus" / "index.bin").kind == "flat"  # the flag over the file's hnsw
    assert "a.txt" in " ".join(documents(data))
    (tmp_path / "bad.yaml").write_text("chunk-tokens: 16\nchunk-size: 3\n")
    r = cli("index", str(corpus), "--config", str(tmp_path / "bad.yaml"), *TINY)
    assert r.returncode == 2 and "'chunk-size' is not an option of `ragblend index`" in r.stderr


def test_config_sections_and_errors_are_read_as_documented(tmp_path):
    known = {"port", "max_batch", "model"}
    assert options_for({"port": 9000, "max-batch": 4}, "serve", known) == {"port": 9000, "max_batch": 4}
    assert options_for({"serve": {"port": 1}, "index": {"model": "x"}}, "serve", known) == {"port": 1}
    with pytest.raises(ConfigError, match="every option goes in one"):
        options_for({"serve": {"port": 1}, "model": "x"}, "serve", known)
    (tmp_path / "c.toml").write_text("port = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config(tmp_path / "c.toml")
    (tmp_path / "c.ini").write_text("port = 1")
    with pytest.raises(ConfigError, match=".toml, .yaml or .yml"):
        read_config(tmp_path / "c.ini")


def test_key_files_name_their_keys_and_refuse_what_they_cannot_read():
    assert parse_keys("# ops\nalice sk-a\n\nsk-b\n") == {"sk-a": "alice", "sk-b": "key-4"}
    for bad, why in (("", "empty"), ("a b c\n", "NAME KEY"), ("x k\ny k\n", "also")):
        with pytest.raises(KeyFileError, match=why):
            parse_keys(bad)


def test_two_named_keys_work_a_revoked_one_does_not_and_json_logs_carry_request_ids(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alice sk-alice-0123456789\nbob sk-bob-0123456789\n")
    s = launch(tmp_path, "--api-key-file", str(keys), "--log-format", "json", "--log-level", "info",
               "--served-model-name", "acme-rag")
    try:
        def get(key: str, **headers) -> httpx.Response:
            return httpx.get(f"{s.base}/v1/models", headers={"Authorization": f"Bearer {key}", **headers})

        for key in ("sk-alice-0123456789", "sk-bob-0123456789"):
            r = get(key)
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "acme-rag" and r.headers["x-request-id"]
        assert get("sk-bob-0123456789", **{"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
        time.sleep(0.02)  # a new mtime even on coarse clocks
        keys.write_text("alice sk-alice-0123456789\n")  # bob revoked
        assert get("sk-bob-0123456789").status_code == 401
        assert get("sk-alice-0123456789").status_code == 200
        chat = httpx.post(f"{s.base}/v1/chat/completions", headers={"Authorization": "Bearer sk-alice-0123456789"},
                          json={"model": "acme-rag", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code in (200, 409) and "does not exist" not in chat.text
    finally:
        s.stop()
    lines = [json.loads(x) for x in (tmp_path / "server.log").read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "ragblend.access"]
    assert {x["api_key"] for x in access if x["path"] == "/v1/models" and x["status"] == 200} == {"alice", "bob"}
    assert any(x["request_id"] == "trace-42" and x["api_key"] == "bob" for x in access)
    assert any(x["status"] == 401 for x in access)
    assert all(x["request_id"] for x in access)
    assert "sk-alice" not in (tmp_path / "server.log").read_text()


def test_version_and_short_help():
    from typer.testing import CliRunner

    from api.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.startswith("ragblend ")
    for args in (["-h"], ["serve", "-h"]):
        r = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "Usage" in r.output, r.output
    assert "--served-model-name" in r.output and "--config" in r.output


def test_a_taken_port_is_refused_before_the_model_loads(tmp_path):
    from typer.testing import CliRunner

    from api.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--model", "nobody-org/not-loaded", "--port", str(port),
                                     "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output, r.output
    assert not (tmp_path / "d").exists()  # refused before the data dir or the model (which does not exist)


def test_a_data_dir_inside_the_corpus_is_left_out_with_a_note(tmp_path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The harbour crane lifts forty tonnes.")
    data = corpus / "ragblend-data"
    for _ in range(2):  # the second run finds the first's index, store and settings under the corpus
        r = cli("index", str(corpus), "--data-dir", str(data), *TINY, "--json")
        assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert set(documents(data)) == {"docs/a.txt"}
    assert [s["reason"] for s in out["skipped"]] == ["ragblend's data directory (its index and KV store), never indexed"]


def test_a_local_model_directory_with_its_tokenizer_answers(tmp_path):
    """The README's recipe for a real instruct model, on the code path: `--model DIR` (what a hub
    download or `save_pretrained` leaves) with random weights of a real shape and a real tokenizer."""
    from transformers import AutoTokenizer

    from api.cli_common import load_engine
    from blend.loader import bundled_model_dir
    from blend.shapes import random_model
    from blend.spec import QuerySpec

    model_dir = tmp_path / "my-instruct-model"
    random_model("tiny-smol", seed=0).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(bundled_model_dir()).save_pretrained(model_dir)
    engine = load_engine(str(model_dir), "cpu", "float32")  # what --model DIR does
    assert engine.tokenizer is not None and engine.name == str(model_dir)
    layout = engine.layout("What does the crane lift?", ["The harbour crane lifts forty tonnes.", "The quay is long."])
    answer = engine.generate(layout, QuerySpec(max_tokens=4)).run()
    assert answer.mode == "blend" and answer.total_tokens == layout.n_tokens and answer.token_ids


def test_ctrl_c_while_indexing_says_what_was_committed_and_a_rerun_resumes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from api.cli import app
    from api.service import RagService
    from retrieval.testing import HashEmbedder

    corpus = tmp_path / "docs"
    corpus.mkdir()
    for name in ("a", "b", "c"):
        (corpus / f"{name}.txt").write_text(f"The {name} harbour crane lifts forty tonnes.")
    real = RagService.index_document
    calls = []

    def interrupted_on_the_second(self, doc, report=None, progress=None):
        calls.append(doc.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, doc, report, progress)

    monkeypatch.setattr(RagService, "index_document", interrupted_on_the_second)
    args = ["index", str(corpus), "--data-dir", str(tmp_path / "data"), *TINY]
    r = CliRunner().invoke(app, args, obj={"embedder": HashEmbedder()})
    assert r.exit_code == 130 and "interrupted: 1 of 3 documents committed" in r.output, r.output
    assert "Run the same command again to resume" in r.output
    monkeypatch.setattr(RagService, "index_document", real)
    again = CliRunner().invoke(app, [*args, "--json"], obj={"embedder": HashEmbedder()})
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["unchanged"] == 1
    assert set(documents(tmp_path / "data")) == {"docs/a.txt", "docs/b.txt", "docs/c.txt"}
