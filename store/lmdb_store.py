"""The persistent KV store: one LMDB environment, chunk hash -> (KV bytes, metadata).

LMDB gives what serving needs without a server process: readers in any number of processes
see consistent snapshots (MVCC) while one writer appends, and a commit is all-or-nothing, so
a crash mid-indexing loses at most the entry in flight. Open one KVStore per process; an LMDB
environment must not cross fork().

The store records its settings in the sub-db `conf`: the format new entries are written in
(`kv_format`, store/quant.py) and an optional cap on the bytes it holds (`max_bytes`). Under a
cap, a write first evicts the least recently used entries (sub-dbs `lru`: key → last use and
size, `age`: last use + key, oldest first) until the new entry fits; whoever needs an evicted
chunk again recomputes it and writes it back. Reads note their keys in memory and record the
recency (and the hit/miss counts) in the next write, or every few seconds, so a read never
waits for a write transaction.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import logging

import lmdb
import torch

from store.quant import kv_format as parse_format
from store.serialize import CorruptEntry, FingerprintMismatch, KVHeader, decode_kv, encode_kv, finish, read_header

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_READERS = 512  # one slot per concurrent read txn across all processes (server threads + tools)
_LRU = struct.Struct(">QQ")   # lru value: last use (clock tick), entry bytes (kv + meta)
_TICK = struct.Struct(">Q")   # age key prefix: big-endian, so the cursor walks oldest first
_FLUSH_EVERY_S = 5.0          # reads' recency and counts reach LMDB at least this often
_FLUSH_AT = 512               # ... or once this many reads are pending
_KEEP = object()              # configure(): leave a setting as it is


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


class StoreDamaged(RuntimeError):
    """The LMDB file cannot be used as it is; the message names the file and the repair."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is damaged ({why}): run `ragblend store rebuild --data-dir "
                         f"{path.parent.parent}` (chunk KV is recomputed as it is needed) or use a fresh data dir")


_META_MAGIC = 0xBEEFC0DE
# An LMDB meta page (lmdb's mdb.c, 64-bit): a 16-byte page header, then MDB_meta: magic u32,
# version u32, address, mapsize, two MDB_db of 48 bytes (the first's md_pad is the page size),
# last page number, txn id.
_META = struct.Struct("<II8x8xI44x48xQQ")


def check_data_file(path: Path) -> None:
    """Refuse a data.mdb shorter than its own meta pages say, before LMDB maps it: pages past the
    end of a truncated file are mapped but have no backing, and touching them is a SIGBUS that
    kills the process without a word. Raises StoreDamaged."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:  # a new environment: LMDB writes the meta pages itself
        return
    try:
        with path.open("rb") as f:
            head = f.read(16 + _META.size)
            metas = []
            if len(head) == 16 + _META.size:
                metas.append(_META.unpack_from(head, 16))
                psize = metas[0][2]
                if psize in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
                    f.seek(psize)
                    second = f.read(16 + _META.size)
                    if len(second) == 16 + _META.size:
                        metas.append(_META.unpack_from(second, 16))
    except OSError as e:
        raise StoreDamaged(path, f"cannot be read: {e.strerror or e}") from None
    valid = [m for m in metas if m[0] == _META_MAGIC and m[2] in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)]
    if not valid:
        raise StoreDamaged(path, "no valid LMDB meta page")
    _, _, psize, last_page, _ = max(valid, key=lambda m: m[4])  # the newer transaction's meta
    need = (last_page + 1) * psize
    if size < need or size < 2 * psize:
        raise StoreDamaged(path, f"truncated: {size:,} bytes, its pages need {max(need, 2 * psize):,}")


class KVStore:
    """Chunk KV (sub-db `kv`) and its JSON metadata (sub-db `meta`) under one LMDB directory."""

    def __init__(self, path: str | Path, map_size: int = 1 << 30, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no ragblend store at {self.path}")
        check_data_file(self.path / "data.mdb")
        try:
            self._env = lmdb.open(str(self.path), map_size=map_size, subdir=True, readonly=readonly,
                                  max_dbs=8, max_readers=_MAX_READERS, lock=True, readahead=False,
                                  create=not readonly)
        except (lmdb.CorruptedError, lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.PageNotFoundError) as e:
            raise StoreDamaged(self.path / "data.mdb", str(e)) from None
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
        self._conf = self._lru = self._age = None
        try:  # absent from a read-only store written before they existed
            self._conf = self._env.open_db(b"conf", create=not readonly)
            self._lru = self._env.open_db(b"lru", create=not readonly)
            self._age = self._env.open_db(b"age", create=not readonly)
        except lmdb.NotFoundError:
            pass
        self._pending_lock = threading.Lock()
        self._touched: dict[bytes, None] = {}   # keys read since the last flush, in order of use
        self._counts = {"hits": 0, "misses": 0}
        self._flushed_at = time.monotonic()

    # -- settings and accounting ------------------------------------------------------------------
    def _conf_get(self, txn: lmdb.Transaction, name: str, default: Any = None) -> Any:
        if self._conf is None:
            return default
        raw = txn.get(name.encode(), db=self._conf)
        return default if raw is None else json.loads(bytes(raw))

    def _conf_put(self, txn: lmdb.Transaction, name: str, value: Any) -> None:
        if value is None:
            txn.delete(name.encode(), db=self._conf)
        else:
            txn.put(name.encode(), json.dumps(value).encode(), db=self._conf)

    def _adopt(self, txn: lmdb.Transaction) -> None:
        """A store written before recency and byte accounting existed: every entry gets a last use
        (in key order, older than any new one) and the byte count its values add up to."""
        if self._conf_get(txn, "accounting"):
            return
        clock, used = self._conf_get(txn, "clock", 0), 0
        with txn.cursor(db=self._kv) as cur:
            sizes = [(bytes(k), len(v)) for k, v in cur.iternext(keys=True, values=True)]
        for k, n in sizes:
            meta = txn.get(k, db=self._meta)
            n += 0 if meta is None else len(meta)
            clock += 1
            self._set_age(txn, k, clock, n)
            used += n
        self._conf_put(txn, "clock", clock)
        self._conf_put(txn, "bytes", used)
        self._conf_put(txn, "accounting", 1)

    def _set_age(self, txn: lmdb.Transaction, k: bytes, tick: int, size: int) -> None:
        old = txn.get(k, db=self._lru)
        if old is not None:
            txn.delete(bytes(old[:8]) + k, db=self._age)
        txn.put(k, _LRU.pack(tick, size), db=self._lru)
        txn.put(_TICK.pack(tick) + k, b"", db=self._age)

    def _forget(self, txn: lmdb.Transaction, k: bytes) -> int:
        """Drop an entry and its recency; the bytes it held (0 if absent)."""
        old = txn.get(k, db=self._lru)
        size = 0
        if old is not None:
            tick, size = _LRU.unpack(bytes(old))
            txn.delete(bytes(old[:8]) + k, db=self._age)
            txn.delete(k, db=self._lru)
        txn.delete(k, db=self._kv)
        txn.delete(k, db=self._meta)
        return size

    def _evict_to(self, txn: lmdb.Transaction, used: int, limit: int, keep: bytes | None = None) -> tuple[int, int]:
        """Evict least recently used entries (never `keep`) until `used` ≤ limit."""
        evicted = 0
        with txn.cursor(db=self._age) as cur:
            victims = []
            for age_key in cur.iternext(keys=True, values=False):
                if used <= limit:
                    break
                k = bytes(age_key[_TICK.size:])
                if k == keep:
                    continue
                victims.append(k)
                used -= _LRU.unpack(bytes(txn.get(k, db=self._lru)))[1]
        for k in victims:
            self._forget(txn, k)
            evicted += 1
        return max(used, 0), evicted

    def _flush_into(self, txn: lmdb.Transaction) -> None:
        """Record the reads noted since the last flush: their recency and the hit/miss counts.
        Every write transaction starts here (adopting an older store's entries first)."""
        self._adopt(txn)
        with self._pending_lock:
            touched, counts = self._touched, self._counts
            self._touched, self._counts = {}, {"hits": 0, "misses": 0}
            self._flushed_at = time.monotonic()
        if not touched and not any(counts.values()):
            return
        clock = self._conf_get(txn, "clock", 0)
        for k in touched:
            old = txn.get(k, db=self._lru)
            if old is not None:  # not evicted or deleted meanwhile
                clock += 1
                self._set_age(txn, k, clock, _LRU.unpack(bytes(old))[1])
        self._conf_put(txn, "clock", clock)
        for name, n in counts.items():
            if n:
                self._conf_put(txn, name, self._conf_get(txn, name, 0) + n)

    def _note_reads(self, keys: Iterable[bytes], hits: int, misses: int) -> None:
        with self._pending_lock:
            for k in keys:
                self._touched.pop(k, None)
                self._touched[k] = None
            self._counts["hits"] += hits
            self._counts["misses"] += misses
            due = (len(self._touched) >= _FLUSH_AT
                   or time.monotonic() - self._flushed_at >= _FLUSH_EVERY_S)
        if due and not self.readonly:
            self.flush()

    def touch(self, keys: Iterable[str]) -> None:
        """Count entries read outside get/get_many (a streamed read) as used now."""
        ks = [_key(k) for k in keys]
        self._note_reads(ks, len(ks), 0)

    def flush(self) -> None:
        """Write the pending reads' recency and counts now (close and writes do it anyway)."""
        with self._pending_lock:
            idle = not self._touched and not any(self._counts.values())
        if not self.readonly and not idle:
            self._txn(self._flush_into, write=True)

    def usage(self) -> dict[str, Any]:
        """The recorded format and cap and the bytes counted against it, without scanning."""
        def read(txn: lmdb.Transaction) -> dict[str, Any]:
            return {"kv_format": self._conf_get(txn, "kv_format"), "max_bytes": self._conf_get(txn, "max_bytes"),
                    "bytes": self._conf_get(txn, "bytes", 0), "entries": txn.stat(self._kv)["entries"],
                    "evictions": self._conf_get(txn, "evictions", 0)}

        return self._txn(read, write=False)

    @property
    def kv_format(self) -> str | None:
        """The format new entries are written in, as recorded; None if never set."""
        return self._txn(lambda txn: self._conf_get(txn, "kv_format"), write=False)

    @property
    def max_bytes(self) -> int | None:
        """The cap on the bytes of stored entries (kv + meta values); None: no cap."""
        return self._txn(lambda txn: self._conf_get(txn, "max_bytes"), write=False)

    def configure(self, kv_format: Any = _KEEP, max_bytes: Any = _KEEP) -> dict[str, Any]:
        """Record the format (refused if it differs from that of entries already stored) and the
        cap (None removes it; a cap below the current use evicts down to it now)."""
        name = _KEEP if kv_format is _KEEP else (None if kv_format is None else parse_format(kv_format).name)
        if max_bytes is not _KEEP and max_bytes is not None and int(max_bytes) <= 0:
            raise ValueError("the store's cap must be a positive number of bytes")

        def write(txn: lmdb.Transaction) -> dict[str, Any]:
            self._flush_into(txn)
            if name is not _KEEP:
                recorded = self._conf_get(txn, "kv_format")
                if recorded is not None and name != recorded and txn.stat(self._kv)["entries"]:
                    raise ValueError(f"the store at {self.path} holds {recorded} KV; it cannot switch to {name} "
                                     f"(remove {self.path} to re-index in {name})")
                self._conf_put(txn, "kv_format", name)
            if max_bytes is not _KEEP:
                cap = None if max_bytes is None else int(max_bytes)
                self._conf_put(txn, "max_bytes", cap)
                if cap is not None:
                    used, evicted = self._evict_to(txn, self._conf_get(txn, "bytes", 0), cap)
                    self._conf_put(txn, "bytes", used)
                    self._conf_put(txn, "evictions", self._conf_get(txn, "evictions", 0) + evicted)
            return {"kv_format": self._conf_get(txn, "kv_format"), "max_bytes": self._conf_get(txn, "max_bytes")}

        return self._txn(write, write=True)

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

    zero_copy = True  # entries are memory-mapped: StagedReader and streamed reads use them in place

    def use_format(self, name: str) -> None:
        """The format the KV cache writes in (the store records its own: see configure)."""

    def put(self, key: str, kv: torch.Tensor, fingerprint: str, meta: dict[str, Any],
            fmt: str | None = None, if_absent: bool = False) -> bool:
        """Store KV (in `fmt`, by default the recorded format, else kv's own dtype) and metadata in
        one write txn: both become visible together or not at all. Under a cap, the least recently
        used entries are evicted first to make room. False (nothing stored, any older value under
        `key` dropped) when the entry alone is larger than the cap; with `if_absent`, also False
        (nothing changed) when `key` already holds a value."""
        if fmt is None:
            fmt = self.kv_format
        return self.put_encoded(key, encode_kv(kv, fingerprint, fmt, key), meta, if_absent=if_absent)

    def put_encoded(self, key: str, value: bytes, meta: dict[str, Any], if_absent: bool = False) -> bool:
        """put() of an entry already encoded (store.serialize.encode_kv): a tier above copies one in."""
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        k = _key(key)
        meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        size = len(value) + len(meta_bytes)
        present = []

        def write(txn: lmdb.Transaction) -> bool:
            self._flush_into(txn)
            if if_absent and txn.get(k, db=self._kv) is not None:
                present.append(True)
                return False
            used = self._conf_get(txn, "bytes", 0) - self._forget(txn, k)
            cap = self._conf_get(txn, "max_bytes")
            if cap is not None:
                if size > cap:
                    self._conf_put(txn, "bytes", used)
                    return False
                used, evicted = self._evict_to(txn, used + size, cap, keep=k)
                used -= size
                if evicted:
                    self._conf_put(txn, "evictions", self._conf_get(txn, "evictions", 0) + evicted)
            txn.put(k, value, db=self._kv)
            txn.put(k, meta_bytes, db=self._meta)
            clock = self._conf_get(txn, "clock", 0) + 1
            self._set_age(txn, k, clock, size)
            self._conf_put(txn, "clock", clock)
            self._conf_put(txn, "bytes", used + size)
            return True

        stored = self._txn(write, write=True, need=size)
        if not stored and not present:
            log.warning("chunk KV %s (%d bytes) is larger than the store's cap; not stored", key[:12], size)
        return stored

    def delete(self, key: str) -> bool:
        """Remove the entry from both sub-dbs; True if anything was there."""
        return self.delete_many([key]) > 0

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove entries in one txn; returns how many existed."""
        ks = [_key(k) for k in keys]

        def write(txn: lmdb.Transaction) -> int:
            self._flush_into(txn)
            n, freed = 0, 0
            for k in ks:
                had = txn.get(k, db=self._kv) is not None or txn.get(k, db=self._meta) is not None
                freed += self._forget(txn, k)
                n += had
            self._conf_put(txn, "bytes", max(0, self._conf_get(txn, "bytes", 0) - freed))
            return n

        return self._txn(write, write=True)

    def get(self, key: str, *, fingerprint: str | None = None, layers: range | list[int] | None = None,
            out: torch.Tensor | None = None, pool: Executor | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """KV [len(layers), 2, H, T, D], or None when absent; `out`/`pool`/`dtype` as in decode_kv
        (a quantized entry comes back dequantized to `dtype`, float32 by default).

        Raises CorruptEntry / FingerprintMismatch; the caller recomputes and overwrites.
        """
        entry = self._read(key, fingerprint, layers, with_meta=False, out=out, pool=pool, dtype=dtype)
        return None if entry is None else entry[0]

    def get_raw(self, key: str, *, fingerprint: str | None = None,
                pool: Executor | None = None) -> tuple[torch.Tensor, KVHeader] | None:
        """An entry's verified layer rows as stored (uint8 [L, layer_nbytes]) and its header, for
        the caller to decode where it wants (store.serialize.to_kv); None when absent."""
        k = _key(key)

        def read(txn: lmdb.Transaction) -> tuple[torch.Tensor, KVHeader] | None:
            buf = txn.get(k, db=self._kv)
            if buf is None:
                return None
            try:
                head = read_header(buf, expect_key=key)
                raw = torch.empty(head.raw_shape(), dtype=torch.uint8)
                return decode_kv(buf, expect_fingerprint=fingerprint, out=raw, pool=pool, expect_key=key), head
            except CorruptEntry as e:
                raise CorruptEntry(f"entry {key}: {e}") from None

        got = self._txn(read, write=False)
        self._note_reads([k], got is not None, got is None)
        return got

    def get_many_raw(self, keys: list[str], fingerprint: str | None = None) -> list:
        """get_raw of each key: its (rows, header), None when absent, or the CorruptEntry /
        FingerprintMismatch that makes it unusable (the store backend interface, store/backend.py)."""
        out: list = []
        for key in keys:
            try:
                out.append(self.get_raw(key, fingerprint=fingerprint))
            except (CorruptEntry, FingerprintMismatch) as e:
                out.append(e)
        return out

    def get_entry(self, key: str, *, fingerprint: str | None = None,
                  layers: range | list[int] | None = None) -> tuple[torch.Tensor, dict] | None:
        """KV and metadata from one snapshot, or None when absent."""
        return self._read(key, fingerprint, layers, with_meta=True)

    def _read(self, key: str, fingerprint: str | None, layers: range | list[int] | None,
              with_meta: bool, out: torch.Tensor | None = None, pool: Executor | None = None,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict | None] | None:
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
                return decode_kv(buf, expect_fingerprint=fingerprint, layers=layers, out=out, pool=pool, expect_key=key,
                                 dtype=dtype), meta
            except CorruptEntry as e:
                raise CorruptEntry(f"entry {key}: {e}") from None

        got = self._txn(read, write=False)
        self._note_reads([k], got is not None, got is None)
        return got

    def get_many(self, keys: list[str], outs: list[torch.Tensor], pool: Executor, *,
                 fingerprint: str | None = None) -> list[torch.Tensor | None]:
        """Several entries from one snapshot, every layer of every entry verified and copied on
        `pool` at once (a request's chunks: one wave of work instead of one per chunk). `outs`:
        one staging tensor per key, raw rows (uint8 [L, layer_nbytes]) or, for a float entry,
        shaped and typed as it; each comes back filled (raw rows still to decode: to_kv). None
        for an absent key."""
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
                    result.append(decode_kv(buf, expect_fingerprint=fingerprint, out=out, pool=pool, pending=pending,
                                                expect_key=key))
                except BaseException as e:
                    futures_wait(pending)  # the copies already queued read buffers this txn maps
                    if isinstance(e, CorruptEntry):
                        raise CorruptEntry(f"entry {key}: {e}") from None
                    raise
            try:  # inside the txn: the buffers are alive until every copy is done
                finish(pending)
            except CorruptEntry as e:
                raise CorruptEntry(f"one of entries {', '.join(keys)}: {e}") from None
            return result

        got = self._txn(read, write=False)
        present = [k for k, g in zip(ks, got) if g is not None]
        self._note_reads(present, len(present), len(ks) - len(present))
        return got

    def header(self, key: str) -> KVHeader | None:
        """The verified header of an entry (dtype, shape, fingerprint), without its payload."""
        k = _key(key)

        def read(txn: lmdb.Transaction) -> KVHeader | None:
            buf = txn.get(k, db=self._kv)
            if buf is None:
                return None
            try:
                return read_header(buf, expect_key=key)
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
        """Entries, value bytes (kv, meta, both), the tokens they hold and KV bytes per token, map
        size, bytes of the file in use, path; the recorded format and cap, the bytes counted
        against the cap, and the hit / miss / eviction counts."""
        if not self.readonly:
            self.flush()

        def read(txn: lmdb.Transaction) -> dict[str, Any]:
            sizes, tokens = {}, 0
            for name, db in (("kv", self._kv), ("meta", self._meta)):
                with txn.cursor(db=db) as cur:
                    sizes[name] = sum(len(v) for v in cur.iternext(keys=False, values=True))
            with txn.cursor(db=self._meta) as cur:
                for k, v in cur.iternext(keys=True, values=True):
                    try:
                        tokens += int(json.loads(bytes(v)).get("n_tokens", 0))
                    except (ValueError, TypeError, AttributeError):
                        pass
            return {"entries": txn.stat(self._kv)["entries"], "kv_bytes": sizes["kv"],
                    "meta_bytes": sizes["meta"], "bytes": sizes["kv"] + sizes["meta"], "tokens": tokens,
                    "kv_bytes_per_token": round(sizes["kv"] / tokens, 1) if tokens else None,
                    "kv_format": self._conf_get(txn, "kv_format"), "max_bytes": self._conf_get(txn, "max_bytes"),
                    "cap_used_bytes": self._conf_get(txn, "bytes", sizes["kv"] + sizes["meta"]),
                    "hits": self._conf_get(txn, "hits", 0), "misses": self._conf_get(txn, "misses", 0),
                    "evictions": self._conf_get(txn, "evictions", 0)}

        out: dict[str, Any] = self._txn(read, write=False)
        info = self._env.info()
        out["map_size"] = info["map_size"]
        out["used_bytes"] = (info["last_pgno"] + 1) * self._env.stat()["psize"]
        out["path"] = str(self.path)
        return out

    def close(self) -> None:
        if not self.readonly:
            try:
                self.flush()
            except lmdb.Error as e:  # recency is advisory: never fail a close over it
                log.warning("could not record the store's recent reads: %s", e)
        self._env.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
