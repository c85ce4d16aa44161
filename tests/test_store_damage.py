"""Damaged data on disk (issue 23, items 9-10): a truncated LMDB file or an altered registry row is
a clear `error:` naming the file and the repair, never a SIGBUS, a traceback or wrong text served."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.chunking import Chunk
from retrieval.loaders import Document
from retrieval.registry import Registry, RegistryDamaged
from store.lmdb_store import KVStore, StoreDamaged

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SECRET = "The Halvard Bridge was designed by Mira Solberg"


def filled_store(kv_dir: Path, n: int = 60) -> None:
    store = KVStore(kv_dir)
    for i in range(n):
        store.put_encoded(f"{i:064x}", os.urandom(64 << 10), {"i": i})
    store.close()


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)


def test_a_truncated_data_mdb_is_refused_with_the_file_and_the_repair_not_a_sigbus(tmp_path):
    kv = tmp_path / "data" / "kv"
    filled_store(kv)
    data = kv / "data.mdb"
    os.truncate(data, data.stat().st_size // 3)
    r = run_py(f"from store.lmdb_store import KVStore\ns = KVStore({str(kv)!r})\n"
               "print(sum(1 for k in s.keys() if s.get_meta(k) is not None))")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # -7 is SIGBUS
    assert "StoreDamaged" in r.stderr and "data.mdb" in r.stderr and "store rebuild" in r.stderr


def test_store_commands_say_error_for_a_truncated_store_and_rebuild_repairs_it(tmp_path):
    data_dir = tmp_path / "data"
    filled_store(data_dir / "kv")
    Registry(data_dir / "corpus" / "registry.sqlite").close()
    os.truncate(data_dir / "kv" / "data.mdb", 3 * 4096)
    cli = [sys.executable, "-m", "api.cli"]
    r = subprocess.run([*cli, "store", "stats", "--data-dir", str(data_dir)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "truncated" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "store rebuild" in r.stderr
    r = subprocess.run([*cli, "store", "rebuild", "--data-dir", str(data_dir)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    store = KVStore(data_dir / "kv", readonly=True)
    assert len(store) == 0
    store.close()
    assert len(list(data_dir.glob("kv.damaged-*/data.mdb"))) == 1  # set aside, not deleted


def registry_with(path: Path, text: str = SECRET) -> Registry:
    reg = Registry(path)
    doc = Document("d", text, "d.txt", {"lang": "en"})
    reg.replace_document(doc, "h", [Chunk("d", 0, text, 0, len(text), 9)], ["k" * 64], np.ones((1, 4), np.float32))
    reg.close()
    return reg


def flip(path: Path, needle: bytes, bit: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.index(needle)
    raw[at] ^= bit
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_chunk_text_is_refused_when_read_not_served(tmp_path):
    path = tmp_path / "registry.sqlite"
    registry_with(path)
    flip(path, b"Mira")  # 'M' -> 'L': still valid UTF-8, and integrity_check says ok
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reg = Registry(path)
    with pytest.raises(RegistryDamaged, match="chunk 1 of document 'd' fails its checksum"):
        reg.get_chunks([1])
    with pytest.raises(RegistryDamaged):
        reg.chunks_of("d")


def damage_registry(path: Path, damage: str) -> None:
    raw = bytearray(path.read_bytes())
    if damage == "not-a-database":
        raw[:16] = b"definitely not s"
    elif damage == "metadata-json":
        raw[raw.index(b'{"lang": "en"}')] ^= 0x40  # '{' -> ';': not JSON any more
    else:  # the b-tree headers of the tables' first pages overwritten
        for page in (1, 2):
            raw[page * 4096:page * 4096 + 12] = b"\xff" * 12
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["not-a-database", "metadata-json", "malformed-page"])
def test_every_registry_corruption_is_registry_damaged_naming_the_file(tmp_path, damage):
    path = tmp_path / "registry.sqlite"
    registry_with(path)
    damage_registry(path, damage)
    with pytest.raises(RegistryDamaged, match="registry.sqlite"):
        reg = Registry(path)
        reg.list_documents()
        reg.get_chunks([1])


def test_a_damaged_registry_is_one_error_line_from_the_cli(tmp_path):
    data_dir = tmp_path / "data"
    KVStore(data_dir / "kv").close()
    path = data_dir / "corpus" / "registry.sqlite"
    registry_with(path)
    damage_registry(path, "metadata-json")
    r = subprocess.run([sys.executable, "-m", "api.cli", "docs", "list", "--data-dir", str(data_dir)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: "), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "registry.sqlite" in r.stderr
