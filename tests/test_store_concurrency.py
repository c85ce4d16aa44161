"""store/ across processes: readers never see torn entries; a killed writer loses at most one."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not pip-installed and pytest does not add its root
    sys.path.insert(0, str(ROOT))

from store import KVStore  # noqa: E402

FP = "fp-concurrency"
TINY_MAP = 64 * 1024  # forces the writer to grow the map while readers hold it open


def entry_tensor(i: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A value derived from the key, different in every layer and token, so a torn or
    mixed-up entry cannot pass as a whole one."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float32) % 4096 + i * 4096).reshape(shape)


def entry_meta(i: int) -> dict:
    return {"i": i, "doc_id": f"doc{i % 7}", "n_tokens": i}


WRITER_IMPORTS = """
import os, signal, sys, time
import torch
import store.lmdb_store
from store import KVStore
"""

WRITER = """
path, n, delay, kill_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
shape = tuple(int(x) for x in sys.argv[5].split(","))
if kill_at >= 0:
    # Die inside the write txn of entry `kill_at`, after its kv and meta are put, before commit.
    real_txn = store.lmdb_store.KVStore._txn
    state = {"puts": 0}
    def _txn(self, fn, *, write, need=0):
        if write:
            if state["puts"] == kill_at:
                def fn_then_die(txn):
                    fn(txn)
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_txn(self, fn_then_die, write=write, need=need)
            state["puts"] += 1
        return real_txn(self, fn, write=write, need=need)
    store.lmdb_store.KVStore._txn = _txn
written = 0
with KVStore(path, map_size=%d) as s:
    for i in range(n):
        key = f"k{i:05d}"
        if s.contains(key):  # resumable: a re-run only fills what is missing
            continue
        s.put(key, entry_tensor(i, shape), %r, entry_meta(i))
        written += 1
        if delay:
            time.sleep(delay)
print("written", written, flush=True)
""" % (TINY_MAP, FP)


def start_writer(path: Path, n: int, *, shape: tuple[int, ...], delay: float = 0.0,
                 kill_at: int = -1) -> subprocess.Popen:
    sources = [inspect.getsource(f) for f in (entry_tensor, entry_meta)]
    code = "\n".join([WRITER_IMPORTS, *sources, WRITER])
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", code, str(path), str(n), str(delay), str(kill_at),
            ",".join(map(str, shape))]
    return subprocess.Popen(args, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def check_entry(store: KVStore, key: str, shape: tuple[int, ...]) -> None:
    """The entry decodes, passes every checksum, has its meta and holds its own values."""
    got = store.get_entry(key, fingerprint=FP)
    assert got is not None, key
    kv, meta = got
    i = int(key[1:])
    assert meta == entry_meta(i)
    assert torch.equal(kv, entry_tensor(i, shape))


def test_reader_process_never_sees_a_torn_entry_while_another_writes(tmp_path):
    n, shape = 120, (4, 2, 2, 64, 32)  # 128 KiB per entry
    path = tmp_path / "s"
    KVStore(path, map_size=TINY_MAP).close()
    writer = start_writer(path, n, shape=shape, delay=0.004)
    partial_snapshots = checked = 0
    with KVStore(path, map_size=TINY_MAP, readonly=True) as reader:
        while writer.poll() is None:
            keys = list(reader.keys())
            partial_snapshots += 0 < len(keys) < n
            for key in keys:
                check_entry(reader, key, shape)
                checked += 1
        out, err = writer.communicate()
        assert writer.returncode == 0, err
        assert sorted(reader.keys()) == [f"k{i:05d}" for i in range(n)]
        for key in reader.keys():
            check_entry(reader, key, shape)
        # The writer grew the map under us; the reader followed instead of failing.
        assert reader.stats()["map_size"] > TINY_MAP
    assert partial_snapshots > 0, "the reader never overlapped the writer; the test proved nothing"
    assert checked > n


def assert_prefix_complete_and_resume(path: Path, n: int, shape: tuple[int, ...]) -> int:
    """Every entry left by the dead writer is whole; a re-run writes exactly the rest."""
    with KVStore(path) as s:
        present = sorted(s.keys())
        for key in present:
            check_entry(s, key, shape)
    rerun = start_writer(path, n, shape=shape)
    out, err = rerun.communicate(timeout=60)  # a writer lock left held by the dead one would hang
    assert rerun.returncode == 0, err
    assert out.split() == ["written", str(n - len(present))]
    with KVStore(path) as s:
        assert len(s) == n
        for key in s.keys():
            check_entry(s, key, shape)
    return len(present)


def test_writer_killed_mid_run_leaves_only_whole_entries_and_a_rerun_completes(tmp_path):
    n, shape = 60, (8, 2, 4, 64, 64)  # 1 MiB per entry, so a kill often lands inside a put
    path = tmp_path / "s"
    KVStore(path, map_size=TINY_MAP).close()
    writer = start_writer(path, n, shape=shape, delay=0.01)
    with KVStore(path, readonly=True) as watcher:
        deadline = time.monotonic() + 30
        while len(watcher) < 10 and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    os.kill(writer.pid, signal.SIGKILL)
    _, err = writer.communicate()
    assert writer.returncode == -signal.SIGKILL, err
    present = assert_prefix_complete_and_resume(path, n, shape)
    assert 10 <= present < n, "the writer was not killed mid-run"


def test_writer_killed_inside_a_write_transaction_loses_only_that_entry(tmp_path):
    n, kill_at, shape = 20, 7, (4, 2, 2, 32, 16)
    path = tmp_path / "s"
    writer = start_writer(path, n, shape=shape, kill_at=kill_at)
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL, err
    with KVStore(path) as s:
        assert sorted(s.keys()) == [f"k{i:05d}" for i in range(kill_at)]
        assert s.get_meta(f"k{kill_at:05d}") is None
    assert assert_prefix_complete_and_resume(path, n, shape) == kill_at
