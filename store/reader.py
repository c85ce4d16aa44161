"""Cold reads of chunk KV from LMDB, fast enough to serve from: every layer's checksum and copy
run on a thread pool, straight into reusable pinned staging buffers (so the host→GPU copy runs at
full DMA speed and asynchronously, instead of through pageable memory). `stream` hands a request's
chunks over layer by layer, so that the GPU computes layer i while layer i+1 is still being read."""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from contextlib import ExitStack, suppress
from dataclasses import dataclass

import numpy as np
import torch

from store.chunkkv import PackedLayers
from store.lmdb_store import KVStore
from store.serialize import CorruptEntry, KVHeader, crc32, crc32_combine, layer_ok, layer_span, open_entry, to_kv


@dataclass
class LayerJob:
    """One layer of every chunk of a request: `copy` lands it in staging (one call on one
    thread, see _join_into: the reads must not starve the thread that queues the prefill);
    `verify` checks the checksums of what was copied and raises CorruptEntry naming the entry."""
    layer: int
    copy: Callable[[], None]
    verify: Callable[[], None]
    nbytes: int
    sources: tuple[memoryview, ...] = ()  # the entries' spans it copies (a gate may wait for them)


class Watchdog:
    """Calls made after a delay unless cancelled, all on one thread: every stream arms one (its
    last-resort start, below), and a threading.Timer per stream cost its planning ~1.5 ms of host
    time on the dev machine (Thread.start waits until the new thread runs), before any layer was
    read. The callback is held weakly for a bound method, so an abandoned stream is not kept."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._due: list[list] = []  # heap of [deadline, n, callback ref, cancelled]
        self._n = 0
        self._thread: threading.Thread | None = None

    def call_later(self, delay_s: float, fn: Callable[[], object]) -> list:
        ref = weakref.WeakMethod(fn) if hasattr(fn, "__self__") else (lambda: fn)
        with self._cv:
            self._n += 1
            item = [time.monotonic() + delay_s, self._n, ref, False]
            heapq.heappush(self._due, item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-watchdog", daemon=True)
                self._thread.start()
            self._cv.notify()
        return item

    def cancel(self, item: list) -> None:
        item[3] = True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._cv.wait(None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                _, _, ref, cancelled = heapq.heappop(self._due)
            fn = None if cancelled else ref()
            if fn is not None:
                try:
                    fn()
                except Exception:  # a last resort must not end the watchdog
                    logging.getLogger(__name__).exception("a stream's last-resort start failed")


WATCHDOG = Watchdog()


class LayerStream:
    """A request's chunk KVs landing in staging buffers layer by layer, from one LMDB snapshot
    that stays open until `close()`. The reads begin at `start()` (or the first `wait()`), every
    layer in plan order; `wait(i)` returns once layer i of every chunk is in place and verified
    (and raises CorruptEntry, naming the entry, if it is not).

    Copy first, verify after: a layer is announced as soon as its bytes are in staging, and its
    checksums are computed on other threads while the GPU already reads it. With `flags` (a
    pinned int32 tensor, one slot per layer), the arrival of layer i is announced by writing
    `seq` to `flags[i]`, so a GPU stream can wait for it without the host. A flag is written even
    when its layer fails (nothing may wait forever): `close()`, which waits for every checksum,
    then raises the failure, and whatever was computed from the stream must be thrown away."""

    def __init__(self, block: torch.Tensor | None, tensors: list[torch.Tensor], jobs: list[LayerJob],
                 copiers: Executor | None, resources: ExitStack,
                 flags: torch.Tensor | None = None, seq: int = 0,
                 decode: Callable[[int], None] | None = None, packed: PackedLayers | None = None,
                 landing: torch.Tensor | None = None, crew: int = 1,
                 gate: Callable[[LayerJob], None] | None = None, heads: Iterable[KVHeader] = ()):
        self.block = block      # [L, 2, H, ΣT, D]: the chunks side by side along the tokens
        self.tensors = tensors  # each chunk's [L, 2, H, T, D] view of it
        self.heads = list(heads)  # the entries' verified headers, in request order
        # Entries stored in another format than the block's land as raw rows first; `decode(i)`
        # then turns layer i of every chunk into the block (on its device), once, in wait(i).
        self._decode, self._decoded = decode, set()
        # ... and with flags, a CUDA prefill may instead copy and decode each layer's packed row
        # itself, on its own stream, without the host waiting (see PackedLayers).
        self.packed = packed
        # `landing` (on the GPU, [L, 2, H, ΣT, D] in the model's dtype): where land(i) puts layer i
        # as the model reads it, so that the chunks can stay in the device tier after the request
        self.landing = landing
        self.landed: set[int] = set()
        self.flags, self.seq = flags, seq
        self._flag_slots = flags.numpy() if flags is not None else None
        self._jobs = jobs
        # `crew` tasks on `copiers` take the layers in plan order, each copying, flagging and
        # verifying one layer at a time (see _work); `gate(job)`, where given, returns once the
        # job's sources are in place (entries still arriving, store/redis_stream.py).
        self._copiers, self._crew_size, self._gate = copiers, max(1, crew), gate
        self._crew: list[Future] = []
        self._taken = itertools.count()
        self._cv = threading.Condition()
        self._done: dict[int, BaseException | None] = {}  # layer → its failure (None: copied and verified)
        self._resources = resources
        self._failure: BaseException | None = None
        self._raised = False
        self._started = False
        self._closed = False
        self._start_lock = threading.Lock()
        # A last resort against a caller that synchronizes with a device waiting on flags it has
        # not started reading for: after a while the reads start anyway.
        self._watchdog = WATCHDOG.call_later(1.0, self.start) if flags is not None and jobs else None
        self.waited_s = 0.0  # host time spent blocked in wait() and close()
        # what the reads moved and how long they took, first read to last (the loading
        # controller's measure of the tier)
        self.nbytes = sum(job.nbytes for job in jobs)
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._planned = {job.layer for job in jobs}

    def start(self, through: int | None = None) -> None:
        """Begin the reads, every layer in plan order (`through` is accepted for callers that
        name the first layer they need: the reads start in order, so it is the first to land). A
        caller whose GPU work waits on the flags must start the reads before anything that
        synchronizes with the device, or it would wait forever."""
        with self._start_lock:
            if self._started or not self._jobs:
                return
            self._started = True
            self._t_first = time.perf_counter()
            self._crew = [self._copiers.submit(self._work) for _ in range(min(self._crew_size, len(self._jobs)))]

    def _work(self) -> None:
        """One of the crew: take the next layer of the plan, copy it into staging, raise its flag,
        verify what was copied; until none is left. A layer costs its thread two returns to the
        GIL (after the copy and after the checksum, both of which run without it): the thread that
        queues the prefill shares the GIL with the crew, and a task per copy and per checksum on
        executors (as before) took it several times more often, each time for longer."""
        jobs = self._jobs
        while (j := next(self._taken)) < len(jobs):
            job, err = jobs[j], None
            try:
                if self._failure is None:  # after a failure, only raise the remaining flags
                    if self._gate is not None:
                        self._gate(job)
                    job.copy()
            except BaseException as e:
                err = e
            finally:
                t = time.perf_counter()
                if self._flag_slots is not None:  # nothing may wait forever, failed or not
                    self._flag_slots[job.layer] = self.seq
            if err is None and self._failure is None:
                try:
                    job.verify()
                except BaseException as e:
                    err = e
            with self._cv:
                self._t_last = t if self._t_last is None else max(self._t_last, t)
                if err is not None:
                    self._failure = self._failure or err
                self._done[job.layer] = err
                self._cv.notify_all()

    def arrived(self, layer: int) -> None:
        """Return once layer `layer` is in staging and verified (raise its failure if not),
        without decoding it: what the host side of a read costs (api/bench_fleet.py stream)."""
        self.start()
        self._result(layer)

    def _result(self, layer: int) -> None:
        """Layer `layer` copied and verified, or its failure raised."""
        with self._cv:
            while layer not in self._done:
                self._cv.wait()
            err = self._done[layer]
        if err is not None:
            raise err

    def wait(self, layer: int) -> None:
        self.start(layer)
        t0 = time.perf_counter()
        try:
            if layer not in self._planned:
                return
            try:
                self._result(layer)
            except CorruptEntry:
                self._raised = True
                raise
            if self._decode is not None and layer not in self._decoded:
                self._decode(layer)
                self._decoded.add(layer)
                if self.landing is self.block:  # decoded into the device block: landed too
                    self.landed.add(layer)
        finally:
            self.waited_s += time.perf_counter() - t0

    def close(self) -> None:
        """Finish every read and checksum (work queued on the flags may be waiting for them), end
        the snapshot, and raise the first failure if wait() has not raised it already."""
        self.start()
        if self._watchdog is not None:
            WATCHDOG.cancel(self._watchdog)
        t0 = time.perf_counter()
        wait_all(self._crew)
        for task in self._crew:  # a crew task ends only by running out of layers: this is a bug
            if task.exception() is not None:
                self._failure = self._failure or task.exception()
        self.waited_s += time.perf_counter() - t0
        self._closed = True  # every read is done (wait() after close returns at once)
        self._resources.close()
        if self._failure is not None and not self._raised:
            self._raised = True
            raise self._failure

    def abandon(self) -> None:
        """End a stream whose reads have not started, reading nothing (its plan is not wanted)."""
        with self._start_lock:
            if self._started:
                raise RuntimeError("the stream's reads have started: close() it")
            self._started = self._closed = True
        if self._watchdog is not None:
            WATCHDOG.cancel(self._watchdog)
        self._resources.close()

    def land(self, i: int) -> None:
        """Queue, on the current stream, layer i's copy (and decode) into `landing`, from where it
        arrived; the caller orders it after the arrival (a flag wait, or after wait(i))."""
        if self.packed is not None:
            self.packed.decode_into(i, self.landing[i])
        else:
            self.landing[i].copy_(self.block[i], non_blocking=True)
        self.landed.add(i)

    def land_rows(self, lo: int, hi: int) -> None:
        """land() for layers lo…hi-1 at once (one copy, one decode launch)."""
        if self.packed is not None:
            self.packed.decode_rows(lo, hi, self.landing[lo:hi])
        else:
            self.landing[lo:hi].copy_(self.block[lo:hi], non_blocking=True)
        self.landed.update(range(lo, hi))

    def loaded(self) -> tuple[int, float] | None:
        """(bytes read, seconds from the first read to the last) once every read is done."""
        if self._t_first is None or self._t_last is None or self._failure is not None or not self._closed:
            return None
        return self.nbytes, self._t_last - self._t_first

    def __enter__(self) -> "LayerStream":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: end the stream without masking that error
            with suppress(Exception):
                self.close()


def _spans(opened: list, layer: int) -> list[memoryview]:
    """Layer `layer` of every opened entry, as it lies in the map."""
    return [layer_span(mv, head, layer) for _, mv, head in opened]


def _as_arrays(spans: list[memoryview]) -> list[np.ndarray]:
    """The spans as read-only uint8 arrays over the map (no copy)."""
    return [np.frombuffer(span, dtype=np.uint8) for span in spans]


def _join_into(srcs: list[np.ndarray], out: np.ndarray, axis: int = 0) -> None:
    """Copy `srcs` side by side along `axis` into `out`, on the calling thread alone.

    Not torch.cat: a CPU torch op fans out over the intra-op OpenMP team of the thread that calls
    it, and those threads spin after each op. Two copier threads thus kept ~30 threads runnable
    on a 16-core H100 host, and the thread that queues the prefill ran ~3× slower while a stream
    was read: blend from int8 LMDB queued its first graph layer at 38 ms against 10 ms with the
    KV on the GPU (profile of 2026-12-07, docs/results/gpu/dec07/run1). numpy copies on one
    thread and releases the GIL while it copies."""
    np.concatenate(srcs, axis=axis, out=out)


def _verify_spans(opened: list, layer: int, spans: list[memoryview]) -> None:
    for (key, _, head), span in zip(opened, spans):
        if not layer_ok(span, head, layer):
            raise CorruptEntry(f"entry {key}: checksum mismatch in layer {layer}")


def _verify_row(opened: list, layer: int, row: np.ndarray, spans: list[memoryview]) -> None:
    """The packed row holds the chunks' layer bytes one after another: one checksum over it,
    against the chunks' checksums combined; only a mismatch looks for the culprit."""
    want = None
    for _, _, head in opened:
        c = head.layer_crcs[layer]
        want = c if want is None else crc32_combine(want, c, head.layer_nbytes)
    if crc32(row) != want:
        _verify_spans(opened, layer, spans)
        raise CorruptEntry(f"checksum mismatch in layer {layer} of a packed row, not in the stored entries")


# Threads copying a stream's layers into staging and checking them, each on one core (_join_into).
# A layer of a request's six int8 entries of the mistral-7b shape is 6.3 MB: at a few GB/s a core
# for the copy and its CRC, four keep the layers ahead of a GPU that computes one in ~0.6 ms.
COPIERS = 4


class StagedReader:
    """`read(key)` returns a pinned CPU tensor that stays valid for the next `slots - 1` reads:
    enough for one request's chunks, whose copies to the GPU finish before the next request."""

    def __init__(self, store: KVStore, *, workers: int | None = None, slots: int = 64, pin: bool | None = None,
                 copiers: int = COPIERS):
        self.store = store
        # Leave two cores to the thread that drives the GPU: it is on the critical path.
        self.pool = ThreadPoolExecutor(max_workers=workers or max(1, min(16, (os.cpu_count() or 1) - 2)),
                                       thread_name_prefix="kv-read")
        # A stream's crew: `copiers` tasks that copy and check its layers, in plan order.
        self.copiers: Executor = ThreadPoolExecutor(max_workers=copiers, thread_name_prefix="kv-copy")
        self.crew = copiers
        # Called with each layer job before its copy, where sources may still be arriving.
        self.gate: Callable[[LayerJob], None] | None = None
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._next = 0
        self._lock = threading.Lock()
        # Arrival flags for streams (see LayerStream); a request number that only grows means
        # they never need resetting while a GPU might still be reading them.
        self.flags = torch.zeros(4096, dtype=torch.int32, pin_memory=self.pin)
        self._seq = 0

    def _staging(self, nbytes: int, slot: int | None) -> torch.Tensor:
        with self._lock:
            if slot is None:
                slot = self._next
                self._next = (self._next + 1) % len(self._buffers)
            buf = self._buffers[slot]
            if buf is None or buf.numel() < nbytes:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
                self._buffers[slot] = buf
        return buf

    def _raw_out(self, head: KVHeader, slot: int | None) -> torch.Tensor:
        n = head.shape[0] * head.layer_nbytes
        return self._staging(n, slot)[:n].view(head.raw_shape())

    @staticmethod
    def _as_kv(raw: torch.Tensor, head: KVHeader, dtype: torch.dtype | None) -> torch.Tensor:
        """A float entry wanted in its own dtype: a view of the staging rows; otherwise decoded
        (on the CPU) into a tensor of its own."""
        if not head.fmt.quantized and dtype in (None, head.fmt.storage):
            return raw.view(head.fmt.storage).view(head.shape)
        return to_kv(raw, head, dtype)

    def read(self, key: str, fingerprint: str | None = None, slot: int | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """KV [L, 2, H, T, D] in a staging buffer, or None when absent; raises CorruptEntry /
        FingerprintMismatch like KVStore.get. `slot`: the buffer to use (a chunk's index in its
        request keeps the pinned buffers few and warm); by default they rotate. An entry in
        another format than `dtype` comes back decoded, in memory of its own."""
        got = self.read_raw(key, fingerprint, slot)
        return None if got is None else self._as_kv(*got, dtype)

    def read_raw(self, key: str, fingerprint: str | None = None,
                 slot: int | None = None) -> tuple[torch.Tensor, KVHeader] | None:
        """An entry's verified rows as stored (uint8 [L, layer_nbytes], in a staging buffer) and its
        header, or None when absent."""
        head = self.store.header(key)
        if head is None:
            return None
        raw = self.store.get(key, fingerprint=fingerprint, out=self._raw_out(head, slot), pool=self.pool)
        return None if raw is None else (raw, head)

    def read_many(self, keys: list[str], fingerprint: str | None = None,
                  dtype: torch.dtype | None = None) -> list[torch.Tensor | None]:
        """A request's chunks at once, into slots 0…len(keys)-1: all their layers verified and
        copied in one wave on the pool."""
        return [None if got is None else self._as_kv(*got, dtype) for got in self.read_many_raw(keys, fingerprint)]

    def read_many_raw(self, keys: list[str], fingerprint: str | None = None) -> list[tuple[torch.Tensor, KVHeader] | None]:
        """read_many's rows as stored, with their headers (decode with store.serialize.to_kv)."""
        heads = [self.store.header(k) for k in keys]
        outs = [torch.empty(0) if head is None else self._raw_out(head, slot) for slot, head in enumerate(heads)]
        got = self.store.get_many(keys, outs, self.pool, fingerprint=fingerprint)
        return [None if h is None or t is None else (t, h) for h, t in zip(heads, got)]

    def stream(self, keys: list[str], layers: Iterable[int], fingerprint: str | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               land: bool = False) -> LayerStream:
        """Plan reading `layers` (in that order: the first needed first) of every chunk in `keys`
        and return at once; the reads begin at the stream's start(). The chunks land side by side
        along the token axis of one staging block, so that a layer of the whole request is one
        contiguous host→device copy. Raises
        KeyError for an absent key, CorruptEntry / FingerprintMismatch for a bad header and
        ValueError for entries of different models, before anything is queued. With `land` (and
        a CUDA `device`), the stream also has a device block every layer can be landed in
        (`land(i)`), in the model's dtype.

        Entries stored in their float dtype, wanted in it (`dtype` None or the same), land as
        they are, in host memory. Any other (quantized entries, or a float format other than
        `dtype`) land as packed raw rows, every chunk of a layer side by side in one row
        (`stream.packed`: each chunk's row as stored, one copy per chunk and layer like a float
        entry's), and `wait(i)` decodes layer i into the block, which is on `device`.
        Either way the arrival of each layer is announced on the flags: a CUDA prefill waits for
        them on its own stream and, for packed rows, copies and dequantizes each layer there, so
        the host never waits per layer. All of a stream's entries must share one format
        (ValueError otherwise: the caller reads them whole)."""
        resources = ExitStack()
        try:
            txn = resources.enter_context(self.store.snapshot())
            opened = []
            for key in keys:
                buf = self.store.raw(txn, key)
                if buf is None:
                    raise KeyError(key)
                try:
                    opened.append((key, *open_entry(buf, fingerprint)))
                except CorruptEntry as e:
                    raise CorruptEntry(f"entry {key}: {e}") from None
            if not opened:
                resources.close()
                return LayerStream(None, [], [], None, ExitStack())
            n_layers, _, heads, _, dim = opened[0][2].shape
            fmt = opened[0][2].fmt
            for key, _, head in opened:
                if (head.shape[0], head.shape[2], head.shape[4]) != (n_layers, heads, dim):
                    raise ValueError(f"entry {key} has shape {head.shape}, unlike {keys[0]}")
            total = sum(head.shape[3] for _, _, head in opened)
            layers = list(layers)
            direct = all(h.fmt == fmt for _, _, h in opened) and not fmt.quantized and dtype in (None, fmt.storage)
            if direct:
                n = n_layers * 2 * heads * total * dim * fmt.storage.itemsize
                block = self._staging(n, 0)[:n].view(fmt.storage).view(n_layers, 2, heads, total, dim)
                rows = block.view(torch.uint8)  # [L, 2, H, ΣT, D·bytes]
                spans, at = [], 0
                for key, mv, head in opened:
                    spans.append((key, mv, head, at, at + head.shape[3]))
                    at += head.shape[3]
                plan = [self._direct_job(opened, i, rows[i], heads, dim * fmt.storage.itemsize) for i in layers]
                decode = None
                packed = None
                landing = None
                if land and torch.device(device or "cpu").type == "cuda":
                    landing = torch.empty((n_layers, 2, heads, total, dim), dtype=fmt.storage, device=device)
            else:
                block, plan, decode, spans, packed = self._packed_plan(opened, layers, dtype, device)
                landing = block if block.device.type == "cuda" else None
        except BaseException:
            resources.close()
            raise
        self.store.touch(keys)
        self._seq += 1
        flags = self.flags if n_layers <= self.flags.numel() else None
        return LayerStream(block, [block[:, :, :, lo:hi] for *_, lo, hi in spans], plan, self.copiers,
                           resources, flags, self._seq, decode, packed, landing, self.crew, self.gate,
                           [head for _, _, head in opened])

    @staticmethod
    def _direct_job(opened: list, i: int, row: torch.Tensor, heads: int, width: int) -> LayerJob:
        """Layer i of entries used as stored: each chunk's [2, H, T, D] bytes into its token span
        of the block's layer row, one cat along the tokens."""
        spans = _spans(opened, i)
        srcs = [a.reshape(2, heads, -1, width) for a in _as_arrays(spans)]
        out = row.numpy()
        return LayerJob(i, lambda: _join_into(srcs, out, axis=2), lambda: _verify_spans(opened, i, spans),
                        sum(len(m) for m in spans), tuple(spans))

    def _packed_plan(self, opened: list, layers: list[int], dtype: torch.dtype | None,
                     device: torch.device | str | None):
        """Entries not usable as they are (quantized, or a float format other than `dtype`): each
        chunk's layer row copied as stored, the chunks of a layer one after another in one
        pinned row ([L, packed bytes] staging; store.quant's packed layout), and the block
        [L, 2, H, ΣT, D] on `device` that `decode(i)` turns layer i into. The packed rows are
        also handed out (PackedLayers), so a CUDA prefill can copy and decode each layer on its
        own stream once its flag is set."""
        n_layers, _, heads, _, dim = opened[0][2].shape
        fmt = opened[0][2].fmt
        for key, _, head in opened:
            if head.fmt != fmt:
                raise ValueError(f"entry {key} is stored as {head.fmt.name}, unlike {opened[0][0]} ({fmt.name})")
        lengths = tuple(head.shape[3] for _, _, head in opened)
        dtype = dtype or fmt.natural_dtype
        device = torch.device(device or "cpu")
        width = fmt.packed_nbytes(heads, dim, lengths)
        raw = self._staging(n_layers * width, 0)[:n_layers * width].view(n_layers, width)
        rows = raw.numpy()
        spans, at, col = [], 0, 0
        for key, mv, head in opened:
            spans.append((key, mv, head, col, at, at + head.shape[3]))
            at += head.shape[3]
            col += head.layer_nbytes

        def job(i: int) -> LayerJob:
            """Layer i: every chunk's stored row, one after another, into the layer's packed row."""
            src = _spans(opened, i)
            srcs = _as_arrays(src)
            verify = ((lambda: _verify_row(opened, i, rows[i], src)) if crc32_combine is not None
                      else (lambda: _verify_spans(opened, i, src)))
            return LayerJob(i, lambda: _join_into(srcs, rows[i]), verify, width, tuple(src))

        plan = [job(i) for i in layers]
        block = torch.empty((n_layers, 2, heads, at, dim), dtype=dtype, device=device)
        index = fmt.packed_index(heads, dim, lengths, device) if len(lengths) > 1 else None

        def decode_into(i: int, out: torch.Tensor) -> None:
            """Layer i's packed row → `out` [2, H, ΣT, D], queued on the current stream of out's
            device (from pinned memory the copy is asynchronous)."""
            row = raw[i].to(out.device, non_blocking=True) if out.device.type == "cuda" else raw[i]
            fmt.decode_packed(row, heads, dim, lengths, out, index)

        def decode_rows(lo: int, hi: int, out: torch.Tensor) -> None:
            """Layers lo…hi-1's packed rows → `out` [hi-lo, 2, H, ΣT, D], queued likewise."""
            rows = raw[lo:hi].to(out.device, non_blocking=True) if out.device.type == "cuda" else raw[lo:hi]
            fmt.decode_packed_rows(rows, heads, dim, lengths, out, index)

        cuda = device.type == "cuda"
        side = torch.cuda.Stream(device) if cuda else None
        if cuda:  # the block's memory may have been freed by work still queued on the compute stream
            side.wait_stream(torch.cuda.current_stream(device))

        def decode(i: int) -> None:
            """Where nothing waits on flags: layer i into the block, whole before this returns."""
            if not cuda:
                decode_into(i, block[i])
                return
            with torch.cuda.stream(side):
                decode_into(i, block[i])
                done = torch.cuda.Event()
                done.record(side)
            done.synchronize()  # the staging row is free again, and block[i] is whole

        return block, plan, decode, [(key, mv, head, lo, hi) for key, mv, head, _, lo, hi in spans], \
            PackedLayers(raw, decode_into, decode_rows)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.copiers.shutdown(wait=False)
