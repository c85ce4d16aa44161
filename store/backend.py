"""The interface ChunkKVCache stores chunk KV through, and the choice of backend by URL.

Two backends implement it:
- `store.lmdb_store.KVStore`, the embedded LMDB file in the data dir (the default): entries are
  memory-mapped, so the cache reads them in place (StagedReader, streamed reads on CUDA);
- `store.redis_store.TieredKVStore`: a Redis (or Valkey) server shared by every replica, behind
  an optional local LMDB cache in the data dir (`--kv-store redis://host:port/db`).

Both hold the same content-addressed keys (store/hashing.py: the model fingerprint is in the key)
and the same bytes (store/serialize.py: a checked header and one CRC32 per layer, never pickle).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from store.serialize import KVHeader

# One entry of a batched read: its verified rows as stored (uint8 [L, layer_nbytes]) and header,
# None when absent, or the CorruptEntry / FingerprintMismatch that makes it unusable.
RawEntry = "tuple[torch.Tensor, KVHeader] | None | Exception"


@runtime_checkable
class KVBackend(Protocol):
    """What ChunkKVCache (and index planning, `store stats`/`gc`) need of a chunk-KV store."""

    zero_copy: bool  # entries are memory-mapped (LMDB): the cache's staged and streamed reads use them in place

    @property
    def kv_format(self) -> str | None:
        """The format recorded for new entries (None: never set)."""
        ...

    def use_format(self, name: str) -> None:
        """The format the cache writes and reads in (a shared store keeps each format apart)."""
        ...

    def configure(self, kv_format: Any = ..., max_bytes: Any = ...) -> dict[str, Any]: ...

    def usage(self) -> dict[str, Any]: ...

    def contains(self, key: str) -> bool: ...

    def put(self, key: str, kv: torch.Tensor, fingerprint: str, meta: dict[str, Any], fmt: str | None = None,
            if_absent: bool = False) -> bool:
        """Store one entry; `if_absent`: only if the key holds none (two writers store one value)."""
        ...

    def put_encoded(self, key: str, value: bytes, meta: dict[str, Any], if_absent: bool = False) -> bool:
        """put() of an entry already encoded (store.serialize.encode_kv, or stage_kv + seal_kv)."""
        ...

    def delete_many(self, keys: Iterable[str]) -> int: ...

    def header(self, key: str) -> KVHeader | None: ...

    def get_raw(self, key: str, *, fingerprint: str | None = None) -> tuple[torch.Tensor, KVHeader] | None:
        """One entry verified whole; raises CorruptEntry / FingerprintMismatch."""
        ...

    def get_many_raw(self, keys: list[str], fingerprint: str | None = None) -> list:
        """A request's entries in one batched read, each a RawEntry (errors per entry, not raised)."""
        ...

    def keys(self) -> Iterator[str]: ...

    def stats(self) -> dict[str, Any]: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class LayerStreaming(Protocol):
    """A backend that is not memory-mapped but can still hand a request's chunks over layer by
    layer (the shared tier, store/redis_stream.py): ChunkKVCache streams through its reader."""

    def layer_reader(self, *, workers: int | None = None, pin: bool | None = None) -> Any:
        """A reader with StagedReader.stream's signature (and `pool`, `close`)."""
        ...


SCHEMES = ("redis://", "rediss://", "unix://")


def open_kv_store(kv_dir: str | Path, url: str | None = None, *, readonly: bool = False) -> KVBackend:
    """The store a data dir's chunk KV lives in: its LMDB (`url` empty or `lmdb`), or a shared
    Redis tier (`redis://[user:password@]host:port/db`, `rediss://` for TLS, `unix:///path.sock`)
    behind the data dir's LMDB as a local cache. Query options of the URL that ragblend reads:
    `local_cache=0` (no local copies; the LMDB then only records the settings), `prefix=NAME:`
    (the key namespace, default `ragblend:`), `fetchers=N` (connections a streamed read of a
    request's chunks uses, default 1); every other one goes to the redis client
    (e.g. `socket_timeout=5`, `ssl_cert_reqs=required`). ValueError when the server is unreachable."""
    from store.lmdb_store import KVStore

    if not url or url.strip().lower() in ("lmdb", "lmdb:"):
        return _with_default_format(KVStore(kv_dir, readonly=readonly), readonly)
    if not url.startswith(SCHEMES):
        raise ValueError(f"--kv-store {url!r}: give redis://host:port/db, rediss://… (TLS), unix:///path/redis.sock, "
                         "or leave it out for the data dir's own LMDB store")
    from store.redis_store import RedisKVStore, TieredKVStore, split_url

    clean, local_cache, prefix, fetchers = split_url(url)
    shared = RedisKVStore(clean, prefix=prefix)
    local = KVStore(kv_dir, readonly=readonly)
    try:
        shared.ping()
    except Exception:
        shared.close()
        local.close()
        raise
    return _with_default_format(TieredKVStore(local, shared, cache_locally=local_cache, fetchers=fetchers), readonly)


def _with_default_format(store: KVBackend, readonly: bool) -> KVBackend:
    """A data dir's store records its format before its first entry, whoever writes that entry
    (`ragblend index`, an API upload, a query's recompute): DEFAULT_FORMAT unless told otherwise
    (`index --kv-dtype` reconfigures it while the store is empty). A store that holds entries
    but records no format (written before formats were recorded) is left as it is."""
    from store.quant import DEFAULT_FORMAT

    if not readonly and store.kv_format is None and not store.usage()["entries"]:
        store.configure(kv_format=DEFAULT_FORMAT)
    return store
