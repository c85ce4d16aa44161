"""ChunkKVCache: the one owner of chunk KV. A request asks it for its chunks' KV by token ids and
gets them from the fastest tier that holds them:

    device tier (GPU, or plain memory on CPU) → pinned-CPU tier → store → recompute

  The store is a backend (store/backend.py): the data dir's LMDB (default), or a Redis tier
  shared by every replica behind a local LMDB cache (store/redis_store.py).

- LMDB is read in one wave per request (every layer's checksum and copy on a thread pool) or, on
  CUDA, streamed layer by layer into the prefill (`fetch(..., layers=…)`), so that reading layer
  i+1 overlaps computing layer i.
- Nothing unverified is used: an entry that is missing, corrupt, of another model or of the
  wrong shape is recomputed through the injected `compute` callback and written back.
- A streamed layer that fails its checksum is only found while the prefill runs; the prefill
  is then void, and `refetch` serves the request again chunk by chunk, recomputing what is bad.
- The store key is computed here, from the token ids, by the code that stores the bytes.
- Entries are written in the store's recorded format (store/quant.py; the model's own dtype if
  none is recorded), and every tier hands the engine the KV as that format decodes it, in the
  model's dtype on its device: quantized bytes are copied to the GPU and dequantized there. A
  chunk computed now (first use, or recomputed) is passed through the same format first, so an
  answer does not depend on which tier served it.

This module knows nothing of the model: `compute` and `KVShape` are all it needs of it.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from store.chunkkv import ArrivingKV, ChunkKV, ChunkRef
from store.hashing import chunk_hash, context_chunk_hash
from store.hot import HotTier
from store.backend import KVBackend, LayerStreaming
from store.quant import KVFormat
from store.quant import kv_format as parse_format
from store.reader import LayerStream, StagedReader
from store.serialize import CorruptEntry, FingerprintMismatch, KVHeader, seal_kv, stage_kv, to_kv
from store.writes import PipelinedWrites

log = logging.getLogger(__name__)

# A chunk's token ids → its KV [L, 2, H_kv, T, D] computed right after the prompt head, on the
# device. Called with the model already held by the caller (the cache takes no model lock).
ComputeKV = Callable[[list[int]], torch.Tensor]
# (chunk ids, context ids) → the KV [L, 2, H_kv, T, D] of the chunk's own T tokens computed with the
# context between the prompt head and the chunk (neighbour-aware entries; ChunkRef).
ComputeInContext = Callable[[list[int], list[int]], torch.Tensor]
# A chunk as fetch and ensure take it: its token ids (the plain entry) or a ChunkRef.
Chunk = Sequence[int] | ChunkRef


def sliced_context(compute: ComputeKV) -> ComputeInContext:
    """ComputeInContext from a plain ComputeKV: the context and the chunk computed as one run of
    tokens behind the prompt head, the chunk's own rows kept (exact: that is what the entry means)."""
    def in_context(ids: list[int], context: list[int]) -> torch.Tensor:
        return compute(list(context) + list(ids))[:, :, :, len(context):].contiguous()
    return in_context


@dataclass(frozen=True)
class KVShape:
    """What a usable entry looks like for the serving model; any other entry is recomputed."""
    fingerprint: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def fits(self, shape: tuple[int, ...], n_tokens: int) -> bool:
        """An entry of this shape (in any format: it decodes to the model's dtype) serves a chunk."""
        return tuple(shape) == (self.n_layers, 2, self.n_kv_heads, n_tokens, self.head_dim)


# The hot tiers' default budgets, as shares of what the machine has free when the service starts:
# the device tier of free device memory (decode KV slots and activations need the rest), the
# pinned tier of available host memory (pinned pages cannot be swapped: keep it a minority).
GPU_TIER_SHARE = 0.25
CPU_TIER_SHARE = 0.25
CPU_TIER_MAX = 64 << 30
CPU_DEVICE_TIER = 1 << 30  # on a CPU-only machine the device tier is plain memory; no pinned tier


def tier_budgets(device: torch.device | str) -> tuple[int, int]:
    """(device tier bytes, pinned-CPU tier bytes) for a cache on `device`, from free memory now."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_DEVICE_TIER, 0
    free, _ = torch.cuda.mem_get_info(device)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 0
    return int(GPU_TIER_SHARE * free), min(CPU_TIER_MAX, int(CPU_TIER_SHARE * avail))


class ChunkKVSource(Protocol):
    """What the engine reads chunk KV through."""

    def fetch(self, chunks: Sequence[Chunk], layers: Sequence[int] | None = None) -> list[ChunkKV] | ArrivingKV:
        """The chunks' KV, in order (token ids, or ChunkRefs for neighbour-aware entries). With `layers` (the order a prefill reads them in), a source
        may hand them over still arriving (ArrivingKV); otherwise they are complete."""
        ...

    def refetch(self, chunks: Sequence[Chunk]) -> list[ChunkKV]:
        """After a streamed fetch failed mid-way: every chunk verified whole, bad ones recomputed."""
        ...


class ChunkKVCache:
    """See the module docstring. `store` None: the tiers alone (chunk KV computed on first use and
    kept in memory: `ask --chunks`, eval, tests). `gpu_bytes`/`cpu_bytes`: the byte budgets of the
    device and pinned-CPU tiers (the pinned tier exists on CUDA only). `stream`: on CUDA, let a
    prefill consume LMDB reads layer by layer. `kv_format`: the format chunk KV is written and
    served in where the store records none (without a store: the precision the tiers hold, e.g.
    for eval to measure a format); default the model's dtype, lossless. `compute_in_context`:
    how a chunk's KV behind other chunks is computed (ChunkRef.context; default: through
    `compute`, see sliced_context)."""

    def __init__(self, shape: KVShape, prefix_ids: Sequence[int], compute: ComputeKV, *, device: torch.device,
                 store: KVBackend | None = None, gpu_bytes: int = 1 << 30, cpu_bytes: int = 0,
                 stream: bool = True, read_workers: int | None = None, kv_format: str | KVFormat | None = None,
                 compute_in_context: ComputeInContext | None = None):
        self.shape, self.prefix_ids, self.compute = shape, list(prefix_ids), compute
        self.compute_in_context = compute_in_context or sliced_context(compute)
        recorded = store.kv_format if store is not None else None
        self.device, self.store = torch.device(device), store
        self.format: KVFormat = parse_format(recorded or kv_format or shape.dtype)
        self.start = len(self.prefix_ids)
        cuda = self.device.type == "cuda"
        self.gpu = HotTier(gpu_bytes, device=self.device)
        self.cpu = HotTier(cpu_bytes, device="cpu", pin=True) if cuda and cpu_bytes > 0 else None
        # On CPU the reader's pool verifies a request's entries at once; its staging buffers are
        # only used where a copy to the device follows (CUDA), since cached tensors must own memory.
        # A store that is not memory-mapped (a shared Redis tier) is read whole in one batched
        # round trip per request (get_many_raw), or streamed through its own layer reader
        # (store/redis_stream.py: from its local LMDB cache, or layer by layer from the tier).
        mapped = store is not None and store.zero_copy
        self.reader = StagedReader(store, workers=read_workers, pin=cuda) if mapped else \
            store.layer_reader(workers=read_workers, pin=cuda) if isinstance(store, LayerStreaming) and cuda else None
        self.stream = stream and cuda and self.reader is not None
        self._count_lock = threading.Lock()
        self._writes: PipelinedWrites | None = None  # while pipelined_writes() is open
        self._writer: PipelinedWrites | None = None  # its thread and buffers, kept between documents
        self.recomputed = 0     # entries missing, corrupt, stale or misshapen when a request needed them
        self.store_reads = 0    # entries a request read from LMDB
        self.last_stream: LayerStream | None = None  # the last streamed read, for its wait statistics

    @property
    def format(self) -> KVFormat:
        return self._format

    @format.setter
    def format(self, fmt: KVFormat) -> None:
        """The format entries are written and served in; the store is told (a shared store keeps
        each format's entries apart)."""
        self._format = fmt
        if self.store is not None:
            self.store.use_format(fmt.name)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- keys and writes -------------------------------------------------------------------------
    def key(self, chunk: Chunk) -> str:
        """The store key: the plain one for bare ids, one that covers the context for a ChunkRef
        with one (so an entry is found only for the exact chunk behind the exact context)."""
        ref = ChunkRef.of(chunk)
        if ref.context:
            return context_chunk_hash(self.shape.fingerprint, self.prefix_ids, ref.context, ref.ids)
        return chunk_hash(self.shape.fingerprint, self.prefix_ids, ref.ids)

    def start_of(self, ref: ChunkRef) -> int:
        """The position the chunk's first token had when its KV was computed."""
        return self.start + ref.n_context

    def _compute(self, ref: ChunkRef) -> torch.Tensor:
        if ref.context:
            return self.compute_in_context(list(ref.ids), ref.context_ids)
        return self.compute(list(ref.ids))

    def ensure(self, chunk: Chunk, meta: dict | None = None) -> tuple[str, bool]:
        """Make sure a chunk's KV exists (indexing, warming): computed and written if absent.
        Returns its key and whether it was computed. With a store, the tiers are left alone (a
        corpus is larger than memory); without one, the device tier keeps it."""
        ref = ChunkRef.of(chunk)
        key = self.key(ref)
        if self.store is None:
            if key in self.gpu or (self.cpu is not None and key in self.cpu):
                return key, False
            self._keep(key, self.format.roundtrip(self._compute(ref)))
            return key, True
        if (self._writes is not None and key in self._writes.keys) or self.store.contains(key):
            return key, False
        # if_absent: another replica that computed the chunk meanwhile keeps its value (one value)
        self._write(key, ref, self._compute(ref), meta or {}, if_absent=True)
        return key, True

    @contextmanager
    def pipelined_writes(self) -> Iterator[None]:
        """Within it, ensure()'s store writes run behind the next chunk's compute
        (store/writes.py); on a clean exit every one is done, or the first failure is raised."""
        if self.store is None or self._writes is not None:
            yield
            return
        if self._writer is None:
            self._writer = PipelinedWrites()
        self._writes = self._writer
        try:
            yield
        except BaseException:
            self._writes.drain(raise_error=False)  # what is queued lands; the failure is the caller's
            raise
        else:
            self._writes.drain()
        finally:
            self._writes = None

    def contains(self, key: str) -> bool:
        if key in self.gpu or (self.cpu is not None and key in self.cpu):
            return True
        return self.store is not None and self.store.contains(key)

    def drop(self, keys: Sequence[str]) -> int:
        """Forget entries everywhere; returns how many the store held."""
        for key in keys:
            self.gpu.pop(key)
            if self.cpu is not None:
                self.cpu.pop(key)
        return self.store.delete_many(keys) if self.store is not None and keys else 0

    def entry_meta(self, ref: ChunkRef | Sequence[int], meta: dict) -> dict:
        """The metadata stored beside a chunk's entry (also by `index --ray`'s driver, which
        writes entries its workers encoded)."""
        ref = ChunkRef.of(ref)
        out = {**meta, "n_tokens": len(ref.ids), "position": self.start_of(ref), "fingerprint": self.shape.fingerprint}
        if ref.context:
            out["context_tokens"] = ref.n_context
        return out

    def _write(self, key: str, ref: ChunkRef, kv: torch.Tensor, meta: dict, if_absent: bool = False) -> None:
        """Into the store in this cache's format (quantized on kv's device; the rows then move).
        `if_absent`: keep a value already there (a shared store's SET NX)."""
        if self.store is None:
            return
        meta = self.entry_meta(ref, meta)
        if self._writes is None:
            self.store.put(key, kv, self.shape.fingerprint, meta, fmt=self.format.name, if_absent=if_absent)
            return
        writes = self._writes
        staged = stage_kv(kv, self.shape.fingerprint, self.format.name, key, alloc=writes.buffer)  # the device part
        writes.submit(key, lambda: self.store.put_encoded(key, seal_kv(staged), meta, if_absent=if_absent), staged)

    def _keep(self, key: str, kv: torch.Tensor) -> torch.Tensor:
        """Into the tiers (pinned CPU, then device); the tensor to use now. One the device tier
        cannot hold stays where it is (pinned: the prefill copies it asynchronously, once)."""
        kept = self.cpu.put(key, kv) if self.cpu is not None else kv
        if kv.device != self.device and kv.numel() * kv.element_size() > self.gpu.max_bytes:
            return kept
        return self.gpu.put(key, kept)

    def _recompute(self, key: str, ref: ChunkRef, why: str, replace: bool = True) -> torch.Tensor:
        """`replace`: the stored value is unusable, overwrite it; otherwise (it was missing) write
        only if nobody has meanwhile. A failed write-back is logged: the answer does not need it."""
        log.warning("chunk %s %s; recomputing", key[:12], why)
        with self._count_lock:
            self.recomputed += 1
        kv = self._compute(ref)
        try:
            self._write(key, ref, kv, {"recomputed_at_query": True}, if_absent=not replace)
        except OSError as e:  # a shared tier that went away (StoreUnavailable), a full disk
            log.warning("could not store the recomputed chunk %s: %s", key[:12], e)
        return self.format.roundtrip(kv)  # what the store now holds, so the answer is the same as from it

    # -- reads ------------------------------------------------------------------------------------
    def fetch(self, chunks: Sequence[Chunk], layers: Sequence[int] | None = None) -> list[ChunkKV] | ArrivingKV:
        """The chunks' KV (bare ids: plain entries; ChunkRefs: the entry behind their context),
        each with the position it was computed at, which the prefill re-rotates from."""
        refs = [ChunkRef.of(c) for c in chunks]
        keys = [self.key(r) for r in refs]
        found: list[torch.Tensor | None] = [self.gpu.get(k) for k in keys]
        if all(t is not None for t in found):
            return [ChunkKV(t, self.start_of(r)) for t, r in zip(found, refs)]
        if self.stream and layers is not None:
            arriving = self._stream(keys, refs, list(layers))
            if arriving is not None:
                return arriving
        if self.cpu is not None:
            found = [t if t is not None else self._from_cpu(k) for k, t in zip(keys, found)]
        cold = [i for i, t in enumerate(found) if t is None]
        if cold:
            for i, kv in zip(cold, self._read_cold([keys[i] for i in cold], [refs[i] for i in cold])):
                found[i] = kv
        return [ChunkKV(t, self.start_of(r)) for t, r in zip(found, refs)]

    def refetch(self, chunks: Sequence[Chunk]) -> list[ChunkKV]:
        out = []
        for chunk in chunks:
            ref = ChunkRef.of(chunk)
            key = self.key(ref)
            kv = self.gpu.get(key)
            if kv is None and self.cpu is not None:
                kv = self._from_cpu(key)
            if kv is None:
                kv = self._keep(key, self._read_one(key, ref))
            out.append(ChunkKV(kv, self.start_of(ref)))
        return out

    def _from_cpu(self, key: str) -> torch.Tensor | None:
        kv = self.cpu.get(key)
        if kv is None or kv.numel() * kv.element_size() > self.gpu.max_bytes:
            return kv
        return self.gpu.put(key, kv)

    def _decode(self, raw: torch.Tensor, head: KVHeader) -> torch.Tensor:
        """Stored rows → the model's dtype: a float entry already in it stays where it is (a view);
        any other moves as stored to the device and is decoded there."""
        if not head.fmt.quantized and head.fmt.storage == self.shape.dtype:
            return raw.view(head.fmt.storage).view(head.shape)
        return to_kv(raw, head, self.shape.dtype, self.device)

    def _read_one(self, key: str, ref: ChunkRef) -> torch.Tensor:
        """One entry from the store, verified whole; recomputed when absent or unusable."""
        if self.store is None:
            return self._recompute(key, ref, "is in no tier")
        try:
            got = self.store.get_raw(key, fingerprint=self.shape.fingerprint)
        except (CorruptEntry, FingerprintMismatch) as e:
            return self._recompute(key, ref, f"unusable ({e})")
        if got is None:
            return self._recompute(key, ref, "is missing", replace=False)
        with self._count_lock:
            self.store_reads += 1
        raw, head = got
        if not self.shape.fits(head.shape, len(ref.ids)):
            return self._recompute(key, ref, f"stored as {head.shape}, unlike the model")
        return self._decode(raw, head)

    def _read_cold(self, keys: list[str], chunks: list[ChunkRef]) -> list[torch.Tensor]:
        """Entries in no memory tier: one wave of verified reads; whatever is absent or bad is then
        recomputed (one bad entry sends the wave's chunks through the per-entry path)."""
        if self.store is None:
            return [self._keep(k, self._recompute(k, ref, "is in no tier")) for k, ref in zip(keys, chunks)]
        if not self.store.zero_copy:
            return self._read_cold_batched(keys, chunks)
        try:
            if self.device.type == "cuda":  # into staging buffers; the tiers copy them to the device
                got = self.reader.read_many_raw(keys, self.shape.fingerprint)
            else:
                heads = [self.store.header(k) for k in keys]
                outs = [torch.empty(0) if h is None else torch.empty(h.raw_shape(), dtype=torch.uint8) for h in heads]
                raws = self.store.get_many(keys, outs, self.reader.pool, fingerprint=self.shape.fingerprint)
                got = [None if h is None or r is None else (r, h) for h, r in zip(heads, raws)]
        except (CorruptEntry, FingerprintMismatch, ValueError) as e:  # ValueError: replaced since its header was read
            log.warning("a chunk KV read failed (%s); reading chunk by chunk", e)
            return [self._keep(k, self._read_one(k, ref)) for k, ref in zip(keys, chunks)]
        out = []
        for key, ref, entry in zip(keys, chunks, got):
            if entry is None:
                kv = self._recompute(key, ref, "is missing", replace=False)
            elif not self.shape.fits(entry[1].shape, len(ref.ids)):
                kv = self._recompute(key, ref, f"stored as {entry[1].shape}, unlike the model")
            else:
                with self._count_lock:
                    self.store_reads += 1
                kv = self._decode(*entry)
            out.append(self._keep(key, kv))
        return out

    def _read_cold_batched(self, keys: list[str], chunks: list[ChunkRef]) -> list[torch.Tensor]:
        """A store read over the network: one batched read of every entry (each verified whole),
        then whatever is absent, corrupt, another model's or misshapen is recomputed."""
        out = []
        for key, ref, entry in zip(keys, chunks, self.store.get_many_raw(keys, self.shape.fingerprint)):
            if entry is None:
                kv = self._recompute(key, ref, "is missing", replace=False)
            elif isinstance(entry, Exception):
                kv = self._recompute(key, ref, f"unusable ({entry})")
            elif not self.shape.fits(entry[1].shape, len(ref.ids)):
                kv = self._recompute(key, ref, f"stored as {entry[1].shape}, unlike the model")
            else:
                with self._count_lock:
                    self.store_reads += 1
                kv = self._decode(*entry)
            out.append(self._keep(key, kv))
        return out

    def _stream(self, keys: list[str], chunks: list[ChunkRef], layers: list[int]) -> ArrivingKV | None:
        """Every entry's header checked (bad or absent ones recomputed into the store first), then
        the reads planned; None when an entry changed in between (the caller reads it whole).
        Entries in the model's dtype stream into pinned memory; quantized ones (or another float
        format) stream as stored, packed per layer, and are dequantized on the GPU. Both announce
        each layer on arrival flags, which the prefill's side stream waits on (see
        StagedReader.stream)."""
        # With a device tier, the layers the prefill does not read are read too, last, so that the
        # whole chunks can stay on the device after the request (see _promote).
        promote = self.gpu.max_bytes > 0
        wanted = set(layers)
        plan = layers + [i for i in range(self.shape.n_layers) if i not in wanted] if promote else layers

        def planned() -> LayerStream:
            return self.reader.stream(keys, plan, self.shape.fingerprint, dtype=self.shape.dtype,
                                      device=self.device, land=promote)

        # Planning opens every entry and checks its header (present, intact, this model's), so a
        # request whose entries are all sound reads each header once; any other is checked entry
        # by entry, bad ones recomputed into the store, and planned again.
        try:
            s = planned()
        except (KeyError, CorruptEntry, FingerprintMismatch, ValueError):
            s = None
        if s is not None and not all(self.shape.fits(h.shape, len(r.ids)) for h, r in zip(s.heads, chunks)):
            s.abandon()
            s = None
        if s is None:
            for key, ref in zip(keys, chunks):
                try:
                    head = self.store.header(key)
                except CorruptEntry as e:
                    self._recompute(key, ref, f"has a bad header ({e})")
                    continue
                if head is None:
                    self._recompute(key, ref, "is missing")
                elif head.fingerprint != self.shape.fingerprint:
                    self._recompute(key, ref, "was computed by another model")
                elif not self.shape.fits(head.shape, len(ref.ids)):
                    self._recompute(key, ref, f"stored as {head.shape}, unlike the model")
            try:
                s = planned()
            except (KeyError, CorruptEntry, FingerprintMismatch, ValueError) as e:
                log.warning("chunk KV changed while planning a streamed read (%s); reading it whole", e)
                return None
        self.last_stream = s
        with self._count_lock:
            self.store_reads += len(keys)
        # The reads begin now, under the rest of the request's host work: a layer is one copy and
        # its checksum runs apart, so they take the GIL too rarely to slow the thread queuing the
        # prefill (and they land in the order the prefill reads them).
        s.start()

        def close() -> None:
            s.close()  # raises if a layer failed: nothing is kept then
            if s.landing is not None:
                self._promote(keys, s)

        return ArrivingKV([ChunkKV(t, self.start_of(r)) for t, r in zip(s.tensors, chunks)], layers, s.wait, close, s.start,
                          s.block, s.flags, s.seq, packed=s.packed, nbytes=s.nbytes, loaded=s.loaded,
                          landing=s.landing, land=s.land, land_rows=s.land_rows)

    def _promote(self, keys: list[str], s: LayerStream) -> None:
        """After a streamed request: its chunks, whole and in the model's dtype on the device, into
        the device tier, so that the next request that retrieves them reads no disk. The layers the
        prefill did not land are landed here (their reads are done: close() waited for them); the
        copies are queued on the current stream, after the prefill's own."""
        for i in range(self.shape.n_layers):
            if i not in s.landed:
                s.wait(i)
                if i not in s.landed:
                    s.land(i)
        at = 0
        for key, t in zip(keys, s.tensors):
            n = t.shape[3]
            if t.numel() * s.landing.element_size() <= self.gpu.max_bytes:
                self.gpu.put(key, s.landing[:, :, :, at:at + n].clone())
            at += n

    def stats(self) -> dict:
        gpu = self.gpu.stats()
        cpu = self.cpu.stats() if self.cpu is not None else {"hits": 0, "entries": 0, "bytes": 0, "max_bytes": 0}
        return {"gpu_hits": gpu["hits"], "gpu_entries": gpu["entries"], "gpu_bytes": gpu["bytes"],
                "gpu_max_bytes": gpu["max_bytes"], "cpu_hits": cpu["hits"], "cpu_entries": cpu["entries"],
                "cpu_bytes": cpu["bytes"], "cpu_max_bytes": cpu["max_bytes"], "store_reads": self.store_reads,
                "recomputed": self.recomputed, "kv_format": self.format.name}
