"""Streamed reads from the shared (Redis/Valkey) tier: a request's chunk KV handed to the prefill
layer by layer, like an LMDB stream, so that the first layer computes while later ones are still
on the wire.

It is the LMDB stream itself (store/reader.py's StagedReader.stream and LayerStream: the same
pinned staging block or packed rows, the same arrival flags, the same CRC per layer and the same
failure rules), fed from entries that are still arriving instead of memory-mapped ones:
- the entries' headers are read first (one round trip); each entry gets a host buffer of its
  length (`ArrivingEntry`) with the header in place, which is what the stream plans from. Those
  buffers are kept for later streams (`EntryBuffers`): a request's entries are ~200 MB for a 7B
  model, and a fresh buffer pays its page faults on first touch (~90 ms per 34 MB entry measured
  on the dev machine, most of a stream's planning time), every request;
- fetch threads then read the layers in the order the prefill consumes them, one pipelined
  GETRANGE of a layer across every chunk per round trip, into those buffers: `fetchers` of them,
  each on its own connection, taking every `fetchers`-th layer (one connection moved ~1.3 GB/s
  with hiredis in the first measurements, a 7B request being ~200 MB of int8 KV; a Redis with
  `io-threads` writes several connections' replies at once). On a machine of few cores more
  connections only contend: on the 2-core dev machine a 7B request took 198 ms over 1, 210 over 2
  and 250 over 4 (`python -m api.bench_fleet stream --fetchers 1,2,4`), so the default is 1 until
  a machine of many cores measures otherwise (the URL's `fetchers=N` sets it);
- the stream's crew copies a layer (into pinned staging) once that layer of every entry has
  arrived (`wait_for_sources`), so a flag is raised only for a layer that is in place; its
  checksums follow, as for LMDB.
A layer that cannot be read (the server gone, the value evicted or replaced since its header was
read) stays zeros and fails its CRC: the prefill is void and the cache's refetch serves the
request whole, recomputing what the tier no longer has (store/tiers.py).

`TieredStreamReader` is what a TieredKVStore streams through: a request whose chunks are all in
the local LMDB cache streams from it, zero-copy, as without a shared tier; any other streams from
the shared tier, whose fetch then reads the layers the prefill did not need and copies every entry
that arrived whole and verified into the local cache, off the request's path.
"""
from __future__ import annotations

import logging
import threading

from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

import numpy as np
import torch

from store.reader import LayerJob, LayerStream, StagedReader
from store.serialize import CorruptEntry, KVHeader, layer_ok, layer_span, read_header

log = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 1 << 30  # idle arriving-entry buffers kept for the next streams (EntryBuffers)
DEFAULT_FETCHERS = 1  # fetch threads (connections) per stream (module docstring)


class ArrivingEntry(bytearray):
    """One entry's bytes as they arrive: its header from the start, each layer once fetched.
    `wait(i)` returns once layer i is in (or will never be: its bytes are then zeros, which fail
    its CRC). A buffer is reused for a later entry of the same length (`reset`), so a layer that
    does not arrive is zeroed rather than left as what the last entry had there."""

    def __init__(self, total: int):
        super().__init__(total)
        self._np = np.frombuffer(self, dtype=np.uint8)  # copies through numpy run without the GIL

    def reset(self, head_bytes: bytes, head: KVHeader) -> "ArrivingEntry":
        self[:len(head_bytes)] = head_bytes
        self.head = head
        self._arrived = [threading.Event() for _ in range(head.shape[0])]
        return self

    def _span(self, layer: int) -> np.ndarray:
        start = self.head.payload_offset + layer * self.head.layer_nbytes
        return self._np[start:start + self.head.layer_nbytes]

    def arrive(self, layer: int, span: bytes | None) -> None:
        dst = self._span(layer)
        if span is not None and len(span) == len(dst):
            np.copyto(dst, np.frombuffer(span, dtype=np.uint8))
        else:  # the value changed since its header was read: this layer must fail its CRC
            dst.fill(0)
        self._arrived[layer].set()

    def give_up(self) -> None:
        """No more layers will come: zero the missing ones and let every waiter go."""
        for i, e in enumerate(self._arrived):
            if not e.is_set():
                self._span(i).fill(0)
                e.set()

    def wait(self, layer: int) -> None:
        self._arrived[layer].wait()


class EntryBuffers:
    """ArrivingEntry buffers kept between streams, by length (a corpus chunked to one token
    budget has few distinct entry lengths), up to `max_bytes` idle; more are allocated when
    streams overlap, and dropped past the bound."""

    def __init__(self, max_bytes: int = DEFAULT_BUFFER_BYTES):
        self.max_bytes = max_bytes
        self._free: dict[int, list[ArrivingEntry]] = {}
        self._idle = 0
        self._lock = threading.Lock()
        self.reused = self.allocated = 0

    def take(self, total: int, head_bytes: bytes, head: KVHeader) -> ArrivingEntry:
        with self._lock:
            free = self._free.get(total)
            buf = free.pop() if free else None
            if buf is not None:
                self._idle -= total
                self.reused += 1
            else:
                self.allocated += 1
        return (ArrivingEntry(total) if buf is None else buf).reset(head_bytes, head)

    def give(self, entries: Iterable[ArrivingEntry]) -> None:
        with self._lock:
            for e in entries:
                if self._idle + len(e) <= self.max_bytes:
                    self._free.setdefault(len(e), []).append(e)
                    self._idle += len(e)


def wait_for_sources(job: LayerJob) -> None:
    """The stream's gate for entries still arriving: a LayerStream layer job (one layer of every
    chunk, store/reader.py's LayerJob) is copied once that layer of each of its entries has
    arrived. The crew takes jobs in plan order, so a waiting thread never holds back a layer
    that has arrived. A layer that never came stays zeros and fails its checksums."""
    for span in job.sources:
        if isinstance(span.obj, ArrivingEntry):
            span.obj.wait(job.layer)


class _Fetch:
    """One stream's entries and the threads that read their layers: the stream's, in its order;
    then, when the entries are to be kept in a local cache, the layers the stream did not ask for,
    after which every entry whose layers all pass their CRC is copied there. That tail runs after
    the stream's own layers, off the request's path (the stream's close does not wait for it).
    With several `fetchers`, thread j reads every fetchers-th layer of that order from j, each on
    a connection of its own (the client's pool hands each thread one); the last to end lets the
    layers that never came go and keeps the entries. The entries' buffers go back to `buffers`
    once both the stream and the fetch are done with them (`release`, called by each)."""

    def __init__(self, shared, keys: list[str], entries: list[ArrivingEntry], layers: list[int], cache_into=None,
                 buffers: EntryBuffers | None = None, fetchers: int = 1):
        self.shared, self.keys, self.entries, self.layers = shared, keys, entries, layers
        self.cache_into, self.buffers = cache_into, buffers
        self._holders = 2  # the stream (its snapshot) and the fetch threads together
        self._holders_lock = threading.Lock()
        n = entries[0].head.shape[0] if entries else 0
        wanted = set(layers)
        self.rest = [i for i in range(n) if i not in wanted] if cache_into is not None else []
        self.by_key = dict(zip(keys, entries))
        self.stop = threading.Event()
        self.error: BaseException | None = None
        order = self.layers + self.rest
        k = max(1, min(fetchers, len(order)))
        self.threads = [threading.Thread(target=self._run, args=(order[j::k],), name=f"kv-fetch-{j}", daemon=True)
                        for j in range(k)]
        self._running = len(self.threads)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            if t.is_alive():
                t.join()

    def release(self) -> None:
        with self._holders_lock:
            self._holders -= 1
            last = self._holders == 0
        if last and self.buffers is not None:
            self.buffers.give(self.entries)

    def _run(self, layers: list[int]) -> None:
        try:
            self._fetch(layers)
        finally:
            with self._holders_lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._end()

    def _fetch(self, layers: list[int]) -> None:
        heads = [e.head for e in self.entries]
        todo = list(layers)
        try:
            while todo and not self.stop.is_set() and self.error is None:
                i = todo[0]
                for entry, span in zip(self.entries, self.shared.layer_spans(self.keys, heads, i)):
                    entry.arrive(i, span)
                todo.pop(0)
        except BaseException as e:  # StoreUnavailable above all: the layers left fail their CRC
            self.error = e
            log.warning("streaming chunk KV from the shared tier stopped: %s", e)
        for i in todo:  # this thread's layers that will not come: zeros (they fail their CRC), now
            for entry in self.entries:
                entry.arrive(i, None)

    def _end(self) -> None:
        try:
            for entry in self.entries:
                entry.give_up()
            if self.cache_into is not None and self.error is None and not self.stop.is_set():
                self._keep()
        finally:
            self.release()

    def _keep(self) -> None:
        """Entries that arrived whole, every layer's CRC checked, into the local cache."""
        for key, entry in zip(self.keys, self.entries):
            head = entry.head
            view = memoryview(entry)
            ok = all(layer_ok(layer_span(view, head, i), head, i) for i in range(head.shape[0]))
            if not ok:
                continue
            try:
                self.cache_into.put_encoded(key, memoryview(entry), {"from_shared": True, "n_tokens": head.shape[3]})
            except OSError as e:  # a full disk must not fail anything: the tier still has it
                log.warning("could not copy chunk %s into the local cache: %s", key[:12], e)


class _ArrivingSource:
    """What StagedReader.stream reads from, for one stream at a time: the planned fetch's entry
    buffers as its 'snapshot'. A fetch that failed is stopped when the snapshot ends."""

    zero_copy = True

    def __init__(self):
        self.pending: _Fetch | None = None
        self.last: _Fetch | None = None

    @contextmanager
    def snapshot(self) -> Iterator[_Fetch]:
        fetch, self.pending = self.pending, None
        self.last = fetch
        fetch.start()
        try:
            yield fetch
        except BaseException:  # planning failed: nothing will read the buffers
            fetch.stop.set()
            raise
        finally:  # the stream is closed (every copy and checksum done) or was never planned
            fetch.release()

    @staticmethod
    def raw(fetch: _Fetch, key: str) -> memoryview | None:
        entry = fetch.by_key.get(key)
        return None if entry is None else memoryview(entry)

    def touch(self, keys: Iterable[str]) -> None:
        pass


class SharedStreamReader:
    """Streams of entries on a RedisKVStore, through the LMDB stream's machinery (module
    docstring). `cache_into`: a KVStore the entries read whole and verified are copied into."""

    def __init__(self, shared, *, workers: int | None = None, pin: bool | None = None, cache_into=None,
                 fetchers: int | None = None):
        self.shared, self.cache_into = shared, cache_into
        self.fetchers = fetchers if fetchers is not None else DEFAULT_FETCHERS
        if self.fetchers < 1:
            raise ValueError(f"fetchers must be ≥ 1, got {self.fetchers}")
        self._source = _ArrivingSource()
        self._reader = StagedReader(self._source, workers=workers, pin=pin)
        self._reader.gate = wait_for_sources
        self._lock = threading.Lock()  # one stream planned at a time (the source holds its fetch)
        self.buffers = EntryBuffers()
        self.streams = 0

    @property
    def pool(self) -> Executor:
        return self._reader.pool

    def stream(self, keys: list[str], layers: Iterable[int], fingerprint: str | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               land: bool = False) -> LayerStream:
        """As StagedReader.stream: raises KeyError for an absent entry, CorruptEntry /
        FingerprintMismatch for a bad header, ValueError for mixed entries, before any layer is
        read; KeyError too when the tier cannot be reached (the cache then reads whole, which
        recomputes what it cannot read)."""
        layers = list(layers)
        entries = []
        try:
            found = self.shared.header_bytes(keys)
        except OSError as e:  # StoreUnavailable: as absent, so the cache reads whole (and recomputes)
            raise KeyError(f"{keys[0] if keys else ''}: {e}") from None
        for key, got in zip(keys, found):
            if got is None:
                raise KeyError(key)
            if isinstance(got, Exception):
                raise got
            total, head_bytes = got
            try:
                head = read_header(head_bytes, total=total, expect_key=key)
            except CorruptEntry as e:
                raise CorruptEntry(f"shared entry {key}: {e}") from None
            entries.append(self.buffers.take(total, head_bytes, head))
        with self._lock:
            self._source.pending = _Fetch(self.shared, list(keys), entries, layers, self.cache_into, self.buffers,
                                          self.fetchers)
            try:
                s = self._reader.stream(keys, layers, fingerprint, dtype=dtype, device=device, land=land)
            finally:
                self._source.pending = None  # planning failed before the snapshot began: nothing fetched
        self.streams += 1
        return s

    def settle(self) -> None:
        """Wait for the last stream's fetch to end (its copy into the local cache included)."""
        fetch = self._source.last
        if fetch is not None:
            fetch.join()

    def close(self) -> None:
        self._reader.close()


class TieredStreamReader:
    """The stream reader of a TieredKVStore: from the local LMDB cache when it holds every
    chunk of the request (its zero-copy stream), else from the shared tier."""

    def __init__(self, tiered, *, workers: int | None = None, pin: bool | None = None, fetchers: int | None = None):
        self.tiered = tiered
        self.local = StagedReader(tiered.local, workers=workers, pin=pin) if tiered.cache_locally else None
        self.remote = SharedStreamReader(tiered.shared, workers=workers, pin=pin, fetchers=fetchers,
                                         cache_into=tiered.local if tiered.cache_locally else None)

    @property
    def pool(self) -> Executor:
        return self.remote.pool

    def stream(self, keys: list[str], layers: Iterable[int], fingerprint: str | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               land: bool = False) -> LayerStream:
        if self.local is not None and all(self.tiered.local.contains(k) for k in keys):
            return self.local.stream(keys, layers, fingerprint, dtype=dtype, device=device, land=land)
        return self.remote.stream(keys, layers, fingerprint, dtype=dtype, device=device, land=land)

    def settle(self) -> None:
        self.remote.settle()

    def close(self) -> None:
        self.remote.settle()
        if self.local is not None:
            self.local.close()
        self.remote.close()
