"""Indexing a folder with hostile files in it (issue 23, items 3-5): every bad file is skipped
with its reason, the good ones are read, the run ends in bounded time, and nothing outside the
folder is read through a symlink."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from eval.hostile import EXPECTED, GOOD, hostile_folder
from retrieval.bounded import BoundedExtractor
from retrieval.formats import Unreadable
from retrieval.loaders import collect_skips, load_path, load_roots


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    # bombs past the 64 MiB limit, markup past the depth limit, all small on disk
    return hostile_folder(tmp_path_factory.mktemp("hostile") / "corpus", bomb_mb=70, depth=5000)


def test_every_hostile_file_is_skipped_with_its_reason_and_the_good_ones_are_read(hostile):
    t0 = time.monotonic()
    with collect_skips() as skipped:
        docs = list(load_roots([hostile]))
    seconds = time.monotonic() - t0
    assert sorted(d.id for d in docs) == sorted(f"corpus/{name}" for name in GOOD)
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert set(reasons) == set(EXPECTED), reasons
    for name, fragment in EXPECTED.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert seconds < 60, seconds


def test_a_file_symlink_out_of_the_folder_is_read_only_when_allowed(hostile):
    ids = {d.id for d in load_path(hostile) if "passwd" in d.id}
    assert not ids
    allowed = [d for d in load_path(hostile, follow_outside=True) if d.id == "passwd-link.txt"]
    assert allowed and "outside the corpus" in allowed[0].text


def test_a_parse_past_its_time_budget_is_skipped_and_the_next_file_is_read(hostile):
    with BoundedExtractor(seconds=0.02) as slow:  # less than the worker takes to start
        with pytest.raises(Unreadable, match="budget"):
            slow.extract(hostile / "good" / "museum.html")
        slow.seconds = 30.0  # the overrun worker was killed; a fresh one serves the next file
        assert "museum" in slow.extract(hostile / "good" / "museum.html").text


@pytest.mark.real
def test_index_run_over_hostile_files_indexes_the_good_ones_and_lists_the_rest(hostile, tmp_path):
    from tests.test_hardening import cli

    r = cli("index", str(hostile), "--data-dir", str(tmp_path / "d"), "--model", "random:tiny-smol",
            "--chunk-tokens", "32", "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["documents"] == len(GOOD)
    assert {Path(s["path"]).name for s in summary["skipped"]} == set(EXPECTED)
    assert "Traceback" not in r.stderr
