"""The persistent KV store: one LMDB environment, chunk hash -> (KV bytes, metadata).

LMDB gives what serving needs without a server process: readers in any number of processes
see consistent snapshots (MVCC) while one writer appends, and a commit is all-or-nothing, so
a crash mid-indexing loses at most the entry in flight. Open one KVStore per process; an LMDB
environment must not cross fork().
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import torch

from store.serialize import CorruptEntry, KVHeader, decode_kv, encode_kv, read_header

T = TypeVar("T")
_MAX_READERS = 512  # one slot per concurrent read txn across all processes (server threads + tools)


class _ResizeGuard:
    """Shared for transactions, exclusive for set_mapsize.

    LMDB requires that no transaction of this process is live while the map is resized, and
    the store is used from several threads (server workers, a prefetcher).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing or self._active:
                self._cond.wait()
            self._resizing = True
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


def _key(key: str) -> bytes:
    try:
        return key.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"store keys are ascii chunk hashes, got {key!r}") from None


def _load_meta(raw: memoryview, key: str) -> dict:
    try:
        return json.loads(bytes(raw))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise CorruptEntry(f"entry {key}: meta is not valid JSON ({e})") from None


class KVStore:
    """Chunk KV (sub-db `kv`) and its JSON metadata (sub-db `meta`) under one LMDB directory."""

    def __init__(self, path: str | Path, map_size: int = 1 << 30, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no ragblend store at {self.path}")
        self._env = lmdb.open(str(self.path), map_size=map_size, subdir=True, readonly=readonly,
                              max_dbs=4, max_readers=_MAX_READERS, lock=True, readahead=False,
                              create=not readonly)
        # A reader killed by SIGKILL keeps its slot, and its snapshot pins old pages, until
        # someone clears it.
        self._env.reader_check()
        self._guard = _ResizeGuard()
        try:
            self._kv = self._env.open_db(b"kv", create=not readonly)
            self._meta = self._env.open_db(b"meta", create=not readonly)
        except lmdb.NotFoundError:
            self._env.close()
            raise FileNotFoundError(f"no ragblend store at {self.path}") from None

    def _txn(self, fn: Callable[[lmdb.Transaction], T], *, write: bool, need: int = 0) -> T:
        """Run `fn` in one transaction, growing or re-reading the map size when LMDB asks."""
        if write and self.readonly:
            raise PermissionError(f"store at {self.path} was opened read-only")
        while True:
            seen = 0
            try:
                with self._guard.shared():
                    seen = self._env.info()["map_size"]
                    with self._env.begin(write=write, buffers=not write) as txn:
                        return fn(txn)
            except lmdb.MapFullError:
                if not write:
                    raise
                self._grow(seen, need)
            except lmdb.MapResizedError:
                # Another process grew the map past ours: adopt the size it recorded.
                with self._guard.exclusive():
                    self._env.set_mapsize(0)

    @contextmanager
    def snapshot(self) -> Iterator[lmdb.Transaction]:
        """A read transaction held open across calls (see `raw`): its buffers point into the map
        and stay valid until it ends. Keep it short; it pins the pages it sees."""
        while True:
            with self._guard.shared():
                try:
                    txn = self._env.begin(write=False, buffers=True)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            with self._guard.exclusive():  # another process grew the map: adopt its size
                self._env.set_mapsize(0)

    def raw(self, txn: lmdb.Transaction, key: str) -> memoryview | None:
        """An entry's bytes, zero-copy, valid while `txn` (from `snapshot`) lives."""
        return txn.get(_key(key), db=self._kv)

    def _grow(self, seen: int, need: int) -> None:
        with self._guard.exclusive():
            current = self._env.info()["map_size"]
            if current > seen:  # another thread already grew it
                return
            self._env.set_mapsize(max(2 * current, current + 2 * need))

    def put(self, key: str, kv: torch.Tensor, fingerprint: str, meta: dict[str, Any]) -> None:
        """Store KV and metadata in one write txn: both become visible together or not at all."""
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        k = _key(key)
        value = encode_kv(kv, fingerprint)
        meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")

        def write(txn: lmdb.Transaction) -> None:
            txn.put(k, value, db=self._kv)
            txn.put(k, meta_bytes, db=self._meta)

        self._txn(write, write=True, need=len(value) + len(meta_bytes))

    def delete(self, key: str) -> bool:
        """Remove the entry from both sub-dbs; True if anything was there."""
        return self.delete_many([key]) > 0

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove entries in one txn; returns how many existed."""
        ks = [_key(k) for k in keys]

        def write(txn: lmdb.Transaction) -> int:
            n = 0
            for k in ks:
                had_kv = txn.delete(k, db=self._kv)
                had_meta = txn.delete(k, db=self._meta)
                n += had_kv or had_meta
            return n

        return self._txn(write, write=True)

    def get(self, key: str, *, fingerprint: str | None = None, layers: range | list[int] | None = None,
            out: torch.Tensor | None = None, pool: Executor | None = None) -> torch.Tensor | None:
        """KV [len(layers), 2, H, T, D], or None when absent; `out`/`pool` as in decode_kv.

        Raises CorruptEntry / FingerprintMismatch; the caller recomputes and overwrites.
        """
        entry = self._read(key, fingerprint, layers, with_meta=False, out=out, pool=pool)
        return None if entry is None else entry[0]

    def get_entry(self, key: str, *, fingerprint: str | None = None,
                  layers: range | list[int] | None = None) -> tuple[torch.Tensor, dict] | None:
        """KV and metadata from one snapshot, or None when absent."""
        return self._read(key, fingerprint, layers, with_meta=True)

    def _read(self, key: str, fingerprint: str | None, layers: range | list[int] | None,
              with_meta: bool, out: torch.Tensor | None = None,
              pool: Executor | None = None) -> tuple[torch.Tensor, dict | None] | None:
        k = _key(key)

        def read(txn: lmdb.Transaction) -> tuple[torch.Tensor, dict | None] | None:
            buf = txn.get(k, db=self._kv)
            if buf is None:
                return None
            meta = None
            if with_meta:
                raw = txn.get(k, db=self._meta)
                if raw is None:
                    raise CorruptEntry(f"entry {key}: kv present without meta")
                meta = _load_meta(raw, key)
            try:  # decode copies out while the txn keeps the buffer alive
                return decode_kv(buf, expect_fingerprint=fingerprint, layers=layers, out=out, pool=pool), meta
            except CorruptEntry as e:
                raise CorruptEntry(f"entry {key}: {e}") from None

        return self._txn(read, write=False)

    def get_many(self, keys: list[str], outs: list[torch.Tensor], pool: Executor, *,
                 fingerprint: str | None = None) -> list[torch.Tensor | None]:
        """Several entries from one snapshot, every layer of every entry verified and copied on
        `pool` at once (a request's chunks: one wave of work instead of one per chunk). `outs`:
        one staging tensor per key, shaped as its entry. None for an absent key."""
        ks = [_key(k) for k in keys]

        def read(txn: lmdb.Transaction) -> list[torch.Tensor | None]:
            pending: list = []
            result: list[torch.Tensor | None] = []
            for key, k, out in zip(keys, ks, outs):
                buf = txn.get(k, db=self._kv)
                if buf is None:
                    result.append(None)
                    continue
                try:
                    result.append(decode_kv(buf, expect_fingerprint=fingerprint, out=out, pool=pool, pending=pending))
                except CorruptEntry as e:
                    raise CorruptEntry(f"entry {key}: {e}") from None
            try:
                for job in pending:  # inside the txn: the buffers are alive until every copy is done
                    job.result()
            except CorruptEntry as e:
                raise CorruptEntry(f"one of entries {', '.join(keys)}: {e}") from None
            return result

        return self._txn(read, write=False)

    def header(self, key: str) -> KVHeader | None:
        """The verified header of an entry (dtype, shape, fingerprint), without its payload."""
        k = _key(key)

        def read(txn: lmdb.Transaction) -> KVHeader | None:
            buf = txn.get(k, db=self._kv)
            if buf is None:
                return None
            try:
                return read_header(buf)
            except CorruptEntry as e:
                raise CorruptEntry(f"entry {key}: {e}") from None

        return self._txn(read, write=False)

    def get_meta(self, key: str) -> dict | None:
        k = _key(key)

        def read(txn: lmdb.Transaction) -> dict | None:
            raw = txn.get(k, db=self._meta)
            return None if raw is None else _load_meta(raw, key)

        return self._txn(read, write=False)

    def contains(self, key: str) -> bool:
        k = _key(key)
        return self._txn(lambda txn: txn.get(k, db=self._kv) is not None, write=False)

    __contains__ = contains

    def keys(self) -> Iterator[str]:
        """Keys of one snapshot; collected first so no read txn stays open across yields."""
        def read(txn: lmdb.Transaction) -> list[str]:
            with txn.cursor(db=self._kv) as cur:
                return [bytes(k).decode("ascii") for k in cur.iternext(keys=True, values=False)]

        return iter(self._txn(read, write=False))

    def __len__(self) -> int:
        return self._txn(lambda txn: txn.stat(self._kv)["entries"], write=False)

    def stats(self) -> dict[str, Any]:
        """Entries, value bytes (kv, meta, both), map size, bytes of the file in use, path."""
        def read(txn: lmdb.Transaction) -> dict[str, int]:
            sizes = {}
            for name, db in (("kv", self._kv), ("meta", self._meta)):
                with txn.cursor(db=db) as cur:
                    sizes[name] = sum(len(v) for v in cur.iternext(keys=False, values=True))
            return {"entries": txn.stat(self._kv)["entries"], "kv_bytes": sizes["kv"],
                    "meta_bytes": sizes["meta"], "bytes": sizes["kv"] + sizes["meta"]}

        out: dict[str, Any] = self._txn(read, write=False)
        info = self._env.info()
        out["map_size"] = info["map_size"]
        out["used_bytes"] = (info["last_pgno"] + 1) * self._env.stat()["psize"]
        out["path"] = str(self.path)
        return out

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
