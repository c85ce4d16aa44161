"""The chunk registry: SQLite rows that are the source of truth for what is indexed.

Everything the vector index holds can be rebuilt from here (each chunk row keeps its
embedding), so the index is only a cache. Every change bumps `generation` in the same
transaction, which is how a saved index file tells whether it still matches.
WAL mode lets other processes read while one writes.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .chunking import Chunk
from .formats import page_at
from .loaders import Document

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0');
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY, source TEXT, content_hash TEXT NOT NULL,
    n_chunks INTEGER NOT NULL, metadata TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL);
-- AUTOINCREMENT: a chunk id is never reused, so a stale id can never name a different chunk.
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id), idx INTEGER NOT NULL, text TEXT NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, n_tokens INTEGER NOT NULL,
    kv_key TEXT NOT NULL, embedding BLOB NOT NULL, UNIQUE (doc_id, idx));
CREATE INDEX IF NOT EXISTS chunks_kv_key ON chunks (kv_key);
-- Indexing jobs of the REST API, so that a restarted server can say which ones it cut short.
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, status TEXT NOT NULL, doc_ids TEXT NOT NULL, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, report TEXT, error TEXT);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
"""
# Added after the first release: created on open where an older registry lacks them.
_CHUNK_PAGE = "ALTER TABLE chunks ADD COLUMN page INTEGER"
# BM25 over the chunk text (SQLite's FTS5), an external-content index kept in step by triggers.
_FTS = """
CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='chunk_id');
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
  INSERT INTO chunks_fts (rowid, text) VALUES (new.chunk_id, new.text); END;
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
  INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.chunk_id, old.text); END;
INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild');
"""
_JOB_COLS = ("job_id", "status", "doc_ids", "created_at", "started_at", "finished_at", "report", "error")
_CHUNK_COLS = 'chunk_id, doc_id, idx, text, start, "end", n_tokens, kv_key, page, text_sum'
# A retrieved chunk with what a citation shows of its document.
_HIT_COLS = ('c.chunk_id, c.doc_id, c.idx, c.text, c.start, c."end", c.n_tokens, c.kv_key, c.page, c.text_sum, '
             'd.n_chunks AS doc_chunks, d.source')


class RegistryDamaged(RuntimeError):
    """The registry file, or a row in it, cannot be trusted; the message names it and the repair."""


def text_sum(text: str) -> str:
    """A chunk text's checksum, kept in its row: SQLite's own checks cover its pages' structure,
    not the bytes of a value, so a flipped bit in a chunk's text would otherwise be served."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _checked(path: Path, row: sqlite3.Row) -> dict:
    chunk = dict(row)
    want = chunk.pop("text_sum")
    if want is not None and text_sum(chunk["text"]) != want:
        raise RegistryDamaged(f"{path}: chunk {chunk['chunk_id']} of document {chunk['doc_id']!r} fails its "
                              f"checksum (its text was altered on disk): delete and re-index that document, "
                              "or re-index into a fresh data dir")
    return chunk
_BATCH = 500  # stays far below SQLite's bound-parameter limit


class Registry:
    """Documents and chunks in one SQLite file; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly, so their extent is visible here.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self.committed_generation: int | None = None  # set by this object's last write
        with self._lock, self._damage():
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a power cut may drop the last commits but never corrupts the file;
            # the index's recorded generation then no longer matches and it is rebuilt.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._add_text_sums()

    def _add_text_sums(self) -> None:
        """Registries written before rows carried a checksum gain the column, filled in once."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(chunks)")}
        if "text_sum" in cols:
            return
        try:
            self._db.execute("ALTER TABLE chunks ADD COLUMN text_sum TEXT")
        except sqlite3.OperationalError:  # read-only: rows stay unchecked
            return
        self._db.create_function("ragblend_text_sum", 1, text_sum, deterministic=True)
        self._db.execute("UPDATE chunks SET text_sum = ragblend_text_sum(text)")

    @contextmanager
    def _damage(self) -> Iterator[None]:
        """SQLite's corruption errors (and undecodable JSON in a row) as RegistryDamaged, which
        every interface reports in one line with the repair."""
        try:
            yield
        except RegistryDamaged:
            raise
        except (sqlite3.DatabaseError, ValueError) as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            raise RegistryDamaged(f"{self.path} is damaged ({type(e).__name__}: {e}): restore it from a backup, "
                                  "or re-index into a fresh data dir") from None

    def _migrate(self) -> None:
        """Bring a registry written by an older release up to this schema (in one transaction;
        looked at again inside it, since another process may be migrating the same file)."""
        if self._current_schema(self._db):
            return
        with self._txn() as db:
            columns = {r[1] for r in db.execute("PRAGMA table_info(chunks)")}
            has_fts = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_fts'").fetchone()
            if "page" not in columns:
                db.execute(_CHUNK_PAGE)
            if not has_fts:
                for statement in _FTS.strip().split(";\n"):
                    db.execute(statement)

    @staticmethod
    def _current_schema(db: sqlite3.Connection) -> bool:
        columns = {r[1] for r in db.execute("PRAGMA table_info(chunks)")}
        return "page" in columns and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_fts'").fetchone() \
            is not None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def generation(self) -> int:
        return int(self._one("SELECT value FROM meta WHERE key = 'generation'")[0])

    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        if key == "generation":
            raise ValueError("generation is managed by the registry")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_document(self, doc_id: str) -> dict | None:
        row = self._one("SELECT * FROM documents WHERE doc_id = ?", (doc_id,))
        with self._damage():
            return _doc_dict(row) if row else None

    def list_documents(self) -> list[dict]:
        rows = self._all("SELECT * FROM documents ORDER BY doc_id")
        with self._damage():
            return [_doc_dict(r) for r in rows]

    def chunks_of(self, doc_id: str) -> list[dict]:
        rows = self._all(f"SELECT {_CHUNK_COLS} FROM chunks WHERE doc_id = ? ORDER BY idx", (doc_id,))
        return [_checked(self.path, r) for r in rows]

    def get_chunks(self, chunk_ids: Iterable[int]) -> list[dict]:
        """Chunk rows in the order asked, with their document's chunk count and source; ids that do
        not exist are left out."""
        ids = [int(i) for i in chunk_ids]
        found: dict[int, dict] = {}
        for b in range(0, len(ids), _BATCH):
            part = ids[b:b + _BATCH]
            q = (f"SELECT {_HIT_COLS} FROM chunks c JOIN documents d USING (doc_id) "
                 f"WHERE c.chunk_id IN ({','.join('?' * len(part))})")
            found.update((r["chunk_id"], _checked(self.path, r)) for r in self._all(q, part))
        return [found[i] for i in ids if i in found]

    def chunk_ids_where(self, condition: str, args: list) -> np.ndarray:
        """Ids of the chunks whose document meets `condition` (SQL over `documents d`, from
        retrieval.search.Filter.sql)."""
        rows = self._all(f"SELECT c.chunk_id FROM chunks c JOIN documents d USING (doc_id) WHERE {condition}", args)
        return np.array([r[0] for r in rows], dtype=np.int64)

    def bm25(self, match: str, n: int, condition: str = "1", args: list | None = None) -> list[int]:
        """The `n` chunks best matching the FTS5 expression `match` by BM25, best first, among
        those whose document meets `condition`."""
        q = ("SELECT f.rowid FROM chunks_fts f JOIN chunks c ON c.chunk_id = f.rowid "
             "JOIN documents d USING (doc_id) "
             f"WHERE chunks_fts MATCH ? AND {condition} ORDER BY bm25(chunks_fts) LIMIT ?")
        return [r[0] for r in self._all(q, [match, *(args or []), n])]

    def embeddings_of(self, chunk_ids: list[int]) -> np.ndarray:
        """float32 [len(chunk_ids), dim], in the order asked (every id must exist)."""
        found: dict[int, bytes] = {}
        for b in range(0, len(chunk_ids), _BATCH):
            part = chunk_ids[b:b + _BATCH]
            q = f"SELECT chunk_id, embedding FROM chunks WHERE chunk_id IN ({','.join('?' * len(part))})"
            found.update((r[0], r[1]) for r in self._all(q, part))
        return np.stack([np.frombuffer(found[i], dtype=np.float32) for i in chunk_ids])

    def count_chunks(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM chunks")[0])

    def kv_keys_in_use(self) -> set[str]:
        return {r[0] for r in self._all("SELECT DISTINCT kv_key FROM chunks")}

    def kv_keys_referenced(self, keys: Iterable[str]) -> set[str]:
        """The subset of `keys` that some chunk still uses."""
        keys = list(set(keys))
        out: set[str] = set()
        for b in range(0, len(keys), _BATCH):
            part = keys[b:b + _BATCH]
            q = f"SELECT DISTINCT kv_key FROM chunks WHERE kv_key IN ({','.join('?' * len(part))})"
            out.update(r[0] for r in self._all(q, part))
        return out

    def replace_document(self, doc: Document, content_hash: str, chunks: list[Chunk],
                         kv_keys: list[str], embeddings: np.ndarray) -> tuple[list[int], list[int]]:
        """Swap a document's rows for new ones in one transaction; returns (old ids, new ids)."""
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if not (len(chunks) == len(kv_keys) == len(emb)):
            raise ValueError(f"{len(chunks)} chunks, {len(kv_keys)} kv keys, {len(emb)} embeddings")
        if any(c.doc_id != doc.id for c in chunks):
            raise ValueError(f"chunks of another document passed for {doc.id!r}")
        with self._lock, self._txn() as db:
            old = [r[0] for r in db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ? ORDER BY idx", (doc.id,))]
            db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc.id,))
            db.execute(
                "INSERT OR REPLACE INTO documents (doc_id, source, content_hash, n_chunks, metadata, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (doc.id, doc.source, content_hash, len(chunks),
                 json.dumps(doc.metadata, sort_keys=True, default=str), time.time()))
            new = []
            for c, key, vec in zip(chunks, kv_keys, emb):
                cur = db.execute(
                    'INSERT INTO chunks (doc_id, idx, text, start, "end", n_tokens, kv_key, embedding, page, text_sum)'
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (doc.id, c.index, c.text, c.start, c.end, c.n_tokens, key, vec.tobytes(),
                     page_at(doc.pages, c.start) if doc.pages else None, text_sum(c.text)))
                new.append(int(cur.lastrowid))
            self.committed_generation = _bump(db)
        return old, new

    def delete_document(self, doc_id: str) -> list[int] | None:
        """Remove a document and its chunks; returns the removed chunk ids, or None if unknown."""
        with self._lock, self._txn() as db:
            if db.execute("SELECT 1 FROM documents WHERE doc_id = ?", (doc_id,)).fetchone() is None:
                return None
            ids = [r[0] for r in db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ? ORDER BY idx", (doc_id,))]
            db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
            self.committed_generation = _bump(db)
        return ids

    # -- indexing jobs (the API's; the chunks above never depend on them) -----------------------
    def put_job(self, job: dict) -> None:
        """Insert or update a job record (the keys of _JOB_COLS; doc_ids a list, report a dict)."""
        row = {**job, "doc_ids": json.dumps(job["doc_ids"]),
               "report": None if job.get("report") is None else json.dumps(job["report"])}
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_JOB_COLS)}) VALUES "
                             f"({', '.join('?' * len(_JOB_COLS))})", [row.get(c) for c in _JOB_COLS])

    def get_job(self, job_id: str) -> dict | None:
        row = self._one(f"SELECT {', '.join(_JOB_COLS)} FROM jobs WHERE job_id = ?", (job_id,))
        if row is None:
            return None
        job = dict(row)
        job["doc_ids"] = json.loads(job["doc_ids"])
        job["report"] = None if job["report"] is None else json.loads(job["report"])
        return job

    def interrupt_jobs(self, error: str) -> int:
        """Mark every job still queued or running as interrupted (after a restart, none is)."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = 'interrupted', error = ?, finished_at = ? "
                                   "WHERE status IN ('queued', 'running')", (error, time.time()))
            return cur.rowcount

    def forget_jobs(self, keep: int) -> None:
        """Keep the `keep` most recently finished job records (unfinished ones are always kept)."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND job_id NOT IN (SELECT job_id "
                             "FROM jobs WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?)", (keep,))

    def all_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of every chunk, for rebuilding the index."""
        _, ids, vecs = self.embeddings_snapshot()
        return ids, vecs

    def embeddings_snapshot(self) -> tuple[int, np.ndarray, np.ndarray]:
        """`all_embeddings` plus the generation they belong to, read in one transaction."""
        with self._lock, self._damage(), self._txn("BEGIN") as db:
            gen = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            rows = db.execute("SELECT chunk_id, embedding FROM chunks ORDER BY chunk_id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        if not rows:
            return gen, ids, np.zeros((0, 0), dtype=np.float32)
        with self._damage():
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        return gen, ids, vecs

    def _txn(self, begin: str = "BEGIN IMMEDIATE"):
        return _Transaction(self._db, begin)

    def _one(self, q: str, args: Iterable = ()) -> sqlite3.Row | None:
        with self._lock, self._damage():
            return self._db.execute(q, tuple(args)).fetchone()

    def _all(self, q: str, args: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock, self._damage():
            return self._db.execute(q, tuple(args)).fetchall()


class _Transaction:
    """BEGIN on enter; COMMIT on success, ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection, begin: str):
        self.db, self.begin = db, begin

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute(self.begin)
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _bump(db: sqlite3.Connection) -> int:
    db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    return int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])


def _doc_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["metadata"] = json.loads(d["metadata"])
    return d
