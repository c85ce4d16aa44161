"""Chunk KV on a Redis (or Valkey) server shared by every replica, behind a local LMDB cache.

Layout: one Redis string per entry, `{prefix}kv:{format}:{chunk hash}`, holding exactly the bytes
the LMDB store holds (store/serialize.py: checked header, then the layers one after another, each
with its CRC32 in the header). So:
- a request's chunks are read in one pipelined round trip (`get_many_raw`), or layer by layer
  with ranged reads (`stream_layers`: the headers first, then one pipelined GETRANGE per layer of
  every chunk), and every layer is verified before use;
- a write is one SET with NX: it is atomic (never seen half-written) and idempotent, so two
  replicas that compute the same chunk at once store one valid value; a value found unusable
  (corrupt, torn, another model's) is replaced by a plain SET of the recomputed one;
- a key Redis evicted (its `maxmemory-policy`, e.g. allkeys-lru) reads as absent: the cache
  recomputes the chunk and writes it back. Nothing in the shared tier is ever trusted unverified.
- the format is part of the key, so replicas storing different formats never see each other's
  entries (an answer never depends on which replica wrote the chunk).

The chunk hash already covers the model fingerprint and prompt head; the header repeats the
fingerprint and is checked too.

`TieredKVStore` puts the data dir's LMDB store in front as a local cache (optional): reads try it
first, a chunk fetched from Redis is copied into it, and writes go to both. Deleting a document
drops its entries from the local cache only: other replicas may reference them in Redis, which
only Redis's eviction (or `ragblend store gc --shared` over every replica's registry) removes.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import torch

from store.breaker import CircuitBreaker
from store.lmdb_store import KVStore
from store.serialize import (CorruptEntry, FingerprintMismatch, KVHeader, decode_kv, encode_kv, header_span, layer_ok,
                             open_entry, read_header)

log = logging.getLogger(__name__)
_HEAD_READ = 4096  # bytes a ranged header read fetches first (a header is ~100 B + 4 B per layer)
_BATCH = 512       # keys per pipeline in scans
# Without a socket timeout a paused or partitioned server stalls every query for as long as it
# lasts. One attempt per call: the fallback (recompute the chunk) is the retry. A URL's own
# `socket_timeout=` / `socket_connect_timeout=` override these.
DEFAULT_SOCKET_TIMEOUT_S = 1.0
DEFAULT_CONNECT_TIMEOUT_S = 1.0


class UrlOptions(NamedTuple):
    url: str                # for the redis client: ragblend's own options taken out
    local_cache: bool       # keep a local LMDB cache in front
    prefix: str             # the key namespace
    fetchers: int | None    # connections a streamed read uses (None: redis_stream.DEFAULT_FETCHERS)


def split_url(url: str) -> UrlOptions:
    """ragblend's own query options of a shared-tier URL taken out, the rest left for the client."""
    parts = urlsplit(url)
    query, local, prefix, fetchers = [], True, "ragblend:", None
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k == "local_cache":
            if v.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ValueError(f"--kv-store: local_cache takes 0 or 1, not {v!r}")
            local = v.lower() in ("1", "true", "yes")
        elif k == "prefix":
            prefix = v
        elif k == "fetchers":
            if not v.isdigit() or not 1 <= int(v) <= 64:
                raise ValueError(f"--kv-store: fetchers takes a count from 1 to 64, not {v!r}")
            fetchers = int(v)
        else:
            query.append((k, v))
    return UrlOptions(urlunsplit(parts._replace(query=urlencode(query))), local, prefix, fetchers)


def redact(url: str) -> str:
    """The URL without its password, for logs and stats."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class StoreUnavailable(OSError):
    """The shared tier could not be reached or answered with an error."""


class RedisKVStore:
    """Chunk KV entries on one Redis server (or cluster: `?cluster=1`), see the module docstring."""

    zero_copy = False

    def __init__(self, url: str, *, prefix: str = "ragblend:", fmt: str | None = None,
                 breaker: CircuitBreaker | None = None):
        import redis

        self._redis = redis
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        limits = {"socket_timeout": DEFAULT_SOCKET_TIMEOUT_S, "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT_S,
                  "retry": Retry(NoBackoff(), 0)}
        if query.pop("cluster", "0").lower() in ("1", "true", "yes"):
            from redis.cluster import RedisCluster

            clean = urlunsplit(parts._replace(query=urlencode(query)))
            self.client = RedisCluster.from_url(clean, **limits)
        else:
            self.client = redis.Redis.from_url(url, **limits)  # the URL's own options win
        self.url, self.prefix, self._fmt = redact(url), prefix, fmt
        self._lock = threading.Lock()
        self.breaker = breaker or CircuitBreaker()
        self.counts = {"hits": 0, "misses": 0, "unusable": 0, "errors": 0, "writes": 0, "write_conflicts": 0}

    # -- keys and settings -----------------------------------------------------------------------
    @property
    def kv_format(self) -> str | None:
        return self._fmt

    def use_format(self, name: str) -> None:
        self._fmt = name

    def _k(self, key: str, fmt: str | None = None) -> str:
        fmt = fmt or self._fmt
        if fmt is None:
            raise ValueError("the shared KV store needs the format its entries are in (use_format)")
        return f"{self.prefix}kv:{fmt}:{key}"

    def _count(self, **n: int) -> None:
        with self._lock:
            for k, v in n.items():
                self.counts[k] += v

    def _fail(self, what: str, e: Exception) -> StoreUnavailable:
        self._count(errors=1)
        return StoreUnavailable(f"shared KV store {self.url}: {what} failed ({type(e).__name__}: {e})")

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """One round trip to the server, through the circuit breaker: refused at once (as
        StoreUnavailable, which readers treat as a miss) while the tier is unhealthy."""
        if not self.breaker.allow():
            raise StoreUnavailable(f"shared KV store {self.url}: unhealthy, {what} skipped (circuit open)")
        try:
            yield
        except self._redis.RedisError as e:
            self.breaker.failure(unreachable=isinstance(e, (self._redis.TimeoutError, self._redis.ConnectionError)))
            raise self._fail(what, e) from None
        except BaseException:
            self.breaker.success()  # the server answered; what failed is ours
            raise
        self.breaker.success()

    @property
    def health(self) -> dict[str, Any]:
        """The tier's state for /health: ok while the breaker is closed, else degraded."""
        state = self.breaker.state
        return {"url": self.url, "status": "ok" if state == "closed" else "degraded", "circuit": state,
                "errors": self.counts["errors"], "circuit_opened": self.breaker.opened,
                "calls_skipped": self.breaker.refused}

    def ping(self) -> None:
        try:
            self.client.ping()
        except self._redis.RedisError as e:
            raise ValueError(f"cannot reach the shared KV store {self.url}: {e}") from None

    # -- writes ----------------------------------------------------------------------------------
    def put(self, key: str, kv: torch.Tensor, fingerprint: str, meta: dict[str, Any] | None = None,
            fmt: str | None = None, if_absent: bool = False) -> bool:
        return self.put_encoded(key, encode_kv(kv, fingerprint, fmt or self._fmt, key), meta, if_absent)

    def put_encoded(self, key: str, value: bytes, meta: dict[str, Any] | None = None, if_absent: bool = False) -> bool:
        """One atomic SET (NX with `if_absent`); True if this call stored the value. `meta` is not
        kept on the shared tier (the header has what reads need)."""
        fmt = read_header(value).fmt.name
        with self._call(f"writing {key[:12]}"):
            stored = bool(self.client.set(self._k(key, fmt), value, nx=if_absent))
        self._count(writes=int(stored), write_conflicts=int(not stored))
        return stored

    def delete_many(self, keys: Iterable[str]) -> int:
        ks = [self._k(k) for k in keys]
        if not ks:
            return 0
        with self._call("deleting"):
            return sum(int(self.client.delete(*ks[i:i + _BATCH])) for i in range(0, len(ks), _BATCH))

    # -- reads -----------------------------------------------------------------------------------
    def values(self, keys: list[str]) -> list[bytes | None]:
        """The entries' bytes as stored, in one pipelined round trip (None: absent or evicted)."""
        if not keys:
            return []
        with self._call(f"reading {len(keys)} entries"):
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.get(self._k(k))
            return list(pipe.execute())

    @staticmethod
    def verify(value: bytes, fingerprint: str | None, key: str) -> tuple[torch.Tensor, KVHeader]:
        """Every layer's CRC checked and copied out: (rows uint8 [L, layer_nbytes], header). A
        value bound to another key than `key` (WrongKey) is refused like a corrupt one."""
        _, head = open_entry(value, fingerprint, key)
        raw = torch.empty(head.raw_shape(), dtype=torch.uint8)
        decode_kv(value, expect_fingerprint=fingerprint, out=raw)
        return raw, head

    def get_many_raw(self, keys: list[str], fingerprint: str | None = None) -> list:
        values = self.values(keys)
        out: list = []
        for key, value in zip(keys, values):
            if value is None:
                out.append(None)
                continue
            try:
                out.append(self.verify(value, fingerprint, key))
            except (CorruptEntry, FingerprintMismatch) as e:
                out.append(type(e)(f"shared entry {key}: {e}"))
        bad = sum(isinstance(x, Exception) for x in out)
        self._count(hits=sum(isinstance(x, tuple) for x in out), misses=values.count(None), unusable=bad)
        return out

    def get_raw(self, key: str, *, fingerprint: str | None = None, pool: Any = None) -> tuple[torch.Tensor, KVHeader] | None:
        got = self.get_many_raw([key], fingerprint)[0]
        if isinstance(got, Exception):
            raise got
        return got

    def headers(self, keys: list[str]) -> list[KVHeader | None | Exception]:
        """The entries' verified headers by ranged reads (STRLEN + GETRANGE), one round trip."""
        out: list = []
        for key, got in zip(keys, self.header_bytes(keys)):
            if got is None or isinstance(got, Exception):
                out.append(got)
                continue
            try:
                out.append(read_header(got[1], total=got[0], expect_key=key))
            except CorruptEntry as e:
                out.append(CorruptEntry(f"shared entry {key}: {e}"))
        return out

    def header_bytes(self, keys: list[str]) -> list[tuple[int, bytes] | None | Exception]:
        """Each entry's (length, header bytes as stored), unverified, by ranged reads (STRLEN +
        GETRANGE) in one round trip; None when absent, CorruptEntry when too short for a header."""
        if not keys:
            return []
        with self._call("reading headers"):
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.strlen(self._k(k))
                pipe.getrange(self._k(k), 0, _HEAD_READ - 1)
            got = pipe.execute()
        out: list = []
        for key, total, prefix in zip(keys, got[0::2], got[1::2]):
            if not total:
                out.append(None)
                continue
            try:
                span = header_span(prefix)
                if span > len(prefix):  # a header longer than the first read: a model of ~1000 layers
                    with self._call("reading a header"):
                        prefix = self.client.getrange(self._k(key), 0, span - 1)
                out.append((int(total), bytes(prefix[:span])))
            except CorruptEntry as e:
                out.append(CorruptEntry(f"shared entry {key}: {e}"))
        return out

    def layer_spans(self, keys: list[str], heads: list[KVHeader], layer: int) -> list[bytes]:
        """Layer `layer` of each entry as stored (unverified: the caller checks its CRC), one
        pipelined GETRANGE per entry in one round trip. A span shorter than the layer means the
        value changed (evicted, replaced) since its header was read."""
        with self._call(f"reading layer {layer}"):
            pipe = self.client.pipeline(transaction=False)
            for key, head in zip(keys, heads):
                start = head.payload_offset + layer * head.layer_nbytes
                pipe.getrange(self._k(key), start, start + head.layer_nbytes - 1)
            return list(pipe.execute())

    def header(self, key: str) -> KVHeader | None:
        got = self.headers([key])[0]
        if isinstance(got, Exception):
            raise got
        return got

    def stream_layers(self, keys: list[str], layers: Iterable[int], fingerprint: str | None = None) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """A request's chunks layer by layer: their headers first (raises KeyError for an absent
        entry, CorruptEntry / FingerprintMismatch for a bad one), then for each layer in `layers`
        one pipelined GETRANGE of it in every chunk, verified against the header's CRC. Yields
        (layer, [its rows (uint8 [layer_nbytes]) per chunk]). A value evicted or replaced since its
        header was read fails its CRC (CorruptEntry): whatever used the earlier layers is void."""
        heads = self.headers(keys)
        for key, head in zip(keys, heads):
            if head is None:
                raise KeyError(key)
            if isinstance(head, Exception):
                raise head
            if fingerprint is not None and head.fingerprint != fingerprint:
                raise FingerprintMismatch(f"shared entry {key} was computed for {head.fingerprint!r}")
        for i in layers:
            spans = self.layer_spans(keys, heads, i)
            rows = []
            for key, head, span in zip(keys, heads, spans):
                if not layer_ok(span, head, i):
                    raise CorruptEntry(f"shared entry {key}: layer {i} changed or failed its checksum")
                rows.append(torch.from_numpy(np.frombuffer(span, dtype=np.uint8).copy()))
            yield i, rows

    def contains(self, key: str) -> bool:
        with self._call("EXISTS"):
            return bool(self.client.exists(self._k(key)))

    __contains__ = contains

    def contains_many(self, keys: list[str]) -> list[bool]:
        with self._call("EXISTS"):
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._k(k))
            return [bool(x) for x in pipe.execute()]

    def keys(self) -> Iterator[str]:
        """The chunk hashes stored in this format (a SCAN: every replica's entries)."""
        start = len(self._k(""))
        with self._call("SCAN"):
            found = [k.decode("ascii")[start:] for k in self.client.scan_iter(match=self._k("*"), count=1000)]
        return iter(found)

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def usage(self) -> dict[str, Any]:
        with self._call("INFO"):
            mem, st = self.client.info("memory"), self.client.info("stats")
        return {"url": self.url, "kv_format": self._fmt, "used_memory": mem.get("used_memory"),
                "maxmemory": mem.get("maxmemory") or None, "maxmemory_policy": mem.get("maxmemory_policy"),
                "evicted_keys": st.get("evicted_keys"), "keyspace_hits": st.get("keyspace_hits"),
                "keyspace_misses": st.get("keyspace_misses")}

    def stats(self) -> dict[str, Any]:
        """Entries and bytes in this format (STRLEN of each: a scan of the namespace), the server's
        memory, cap, policy and evictions, and this process's counts."""
        keys = list(self.keys())
        size = 0
        with self._call("STRLEN"):
            for i in range(0, len(keys), _BATCH):
                pipe = self.client.pipeline(transaction=False)
                for k in keys[i:i + _BATCH]:
                    pipe.strlen(self._k(k))
                size += sum(int(x) for x in pipe.execute())
        return {**self.usage(), "entries": len(keys), "kv_bytes": size, "prefix": self.prefix, **self.counts}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a pool of dead connections must not fail a shutdown
            pass


class TieredKVStore:
    """The data dir's LMDB store as a local cache in front of the shared Redis tier (module
    docstring). The LMDB store also keeps the data dir's settings (format, local cap)."""

    zero_copy = False

    def __init__(self, local: KVStore, shared: RedisKVStore, *, cache_locally: bool = True,
                 fetchers: int | None = None):
        self.local, self.shared, self.cache_locally = local, shared, cache_locally
        self.fetchers = fetchers  # connections per streamed read (None: redis_stream.DEFAULT_FETCHERS)
        if local.kv_format:
            shared.use_format(local.kv_format)

    @property
    def path(self) -> Path:
        return self.local.path

    @property
    def kv_format(self) -> str | None:
        return self.local.kv_format

    @property
    def max_bytes(self) -> int | None:
        return self.local.max_bytes

    def use_format(self, name: str) -> None:
        self.shared.use_format(name)

    def configure(self, **kw: Any) -> dict[str, Any]:
        """The settings are the data dir's (its LMDB): the format, and the local cache's cap."""
        out = self.local.configure(**kw)
        if out.get("kv_format"):
            self.shared.use_format(out["kv_format"])
        return out

    def usage(self) -> dict[str, Any]:
        """The local cache's (what the cap and the disk estimate concern), with the shared tier's."""
        return {**self.local.usage(), "shared": self.shared.usage()}

    def contains(self, key: str) -> bool:
        if self.cache_locally and self.local.contains(key):
            return True
        return self.shared.contains(key)

    __contains__ = contains

    def put(self, key: str, kv: torch.Tensor, fingerprint: str, meta: dict[str, Any], fmt: str | None = None,
            if_absent: bool = False) -> bool:
        """Into Redis (SET NX with `if_absent`), then the local cache. When another replica's value
        won the race, the local cache is left to take that one on its next read, so that every
        replica serves the same bytes."""
        value = encode_kv(kv, fingerprint, fmt or self.shared.kv_format or self.local.kv_format, key)
        return self.put_encoded(key, value, meta, if_absent=if_absent)

    def put_encoded(self, key: str, value: bytes, meta: dict[str, Any], if_absent: bool = False) -> bool:
        """put() of an entry already encoded (store.serialize.encode_kv)."""
        stored = self.shared.put_encoded(key, value, meta, if_absent=if_absent)
        if stored and self.cache_locally:
            self.local.put_encoded(key, value, meta)
        return stored

    def delete_many(self, keys: Iterable[str]) -> int:
        """Only the local cache's copies: other replicas may reference these entries in Redis."""
        return self.local.delete_many(keys) if self.cache_locally else 0

    def header(self, key: str) -> KVHeader | None:
        if self.cache_locally:
            try:
                head = self.local.header(key)
            except CorruptEntry:
                head = None
            if head is not None:
                return head
        try:
            return self.shared.header(key)
        except StoreUnavailable as e:  # as a read that fails: a miss, the chunk is recomputed
            log.warning("%s; treating chunk %s as absent", e, key[:12])
            return None

    def get_many_raw(self, keys: list[str], fingerprint: str | None = None) -> list:
        out: list = [None] * len(keys)
        cold = list(range(len(keys)))
        if self.cache_locally:
            cold = []
            for i, key in enumerate(keys):
                try:
                    out[i] = self.local.get_raw(key, fingerprint=fingerprint)
                except (CorruptEntry, FingerprintMismatch) as e:
                    log.warning("local copy of chunk %s unusable (%s); reading the shared tier", key[:12], e)
                    self.local.delete_many([key])
                if out[i] is None:
                    cold.append(i)
        if not cold:
            return out
        try:
            values = self.shared.values([keys[i] for i in cold])
        except StoreUnavailable as e:  # a read that fails is a miss: the chunk is recomputed
            log.warning("%s; recomputing what the local tiers lack", e)
            return out
        hits = misses = bad = 0
        for i, value in zip(cold, values):
            if value is None:
                misses += 1
                continue
            try:
                out[i] = self.shared.verify(value, fingerprint, keys[i])
                hits += 1
            except (CorruptEntry, FingerprintMismatch) as e:
                out[i] = type(e)(f"shared entry {keys[i]}: {e}")
                bad += 1
                continue
            if self.cache_locally:
                self.local.put_encoded(keys[i], value, {"from_shared": True, "n_tokens": out[i][1].shape[3]})
        self.shared._count(hits=hits, misses=misses, unusable=bad)
        return out

    def get_raw(self, key: str, *, fingerprint: str | None = None, pool: Any = None) -> tuple[torch.Tensor, KVHeader] | None:
        got = self.get_many_raw([key], fingerprint)[0]
        if isinstance(got, Exception):
            raise got
        return got

    def keys(self) -> Iterator[str]:
        """The shared tier's keys (in this format): every replica's entries."""
        return self.shared.keys()

    def layer_reader(self, *, workers: int | None = None, pin: bool | None = None):
        """Streams from the local cache when it holds a request's chunks, else from the shared
        tier (store/redis_stream.py)."""
        from store.redis_stream import TieredStreamReader

        return TieredStreamReader(self, workers=workers, pin=pin, fetchers=self.fetchers)

    def stats(self) -> dict[str, Any]:
        return {"local_cache": self.local.stats() if self.cache_locally else None, "shared": self.shared.stats()}

    def flush(self) -> None:
        self.local.flush()

    def close(self) -> None:
        self.shared.close()
        self.local.close()
