"""`ragblend store stats` and `store gc` over a shared chunk-KV tier (`--kv-store redis://…`).

A replica knows only its own registry. On the shared tier, an entry this registry does not
reference may be another replica's, so gc never removes it on its own: it removes the local
cache's unreferenced copies, counts the shared entries no registry it can see references, and
removes those only with `--shared`, which says the registries given (`--data-dir` and every
`--replica`) are all the replicas there are. Redis's own eviction (its maxmemory-policy) is the
usual way unreferenced entries leave the shared tier; a chunk evicted while still referenced is
recomputed by whichever replica needs it next.
"""
from __future__ import annotations

from pathlib import Path

from api.neighbour_index import referenced_keys
from retrieval.registry import Registry
from store.backend import open_kv_store
from store.redis_store import TieredKVStore

NOTE = ("shared entries no registry given references were left in place: other replicas may reference them. "
        "Redis evicts by its maxmemory-policy (e.g. allkeys-lru); `store gc --shared --replica DIR …` removes "
        "the entries that none of the given data dirs (this one and every --replica) references")


def open_tiered(path: Path, url: str) -> TieredKVStore:
    store = open_kv_store(path / "kv", url)
    if not isinstance(store, TieredKVStore):
        store.close()
        raise ValueError(f"--kv-store {url!r} is not a shared tier")
    fmt = store.kv_format
    if fmt is None:
        store.close()
        raise ValueError(f"{path} records no KV format yet: index it first")
    return store


def stats(path: Path, url: str) -> dict:
    store = open_tiered(path, url)
    try:
        reg = Registry(path / "corpus" / "registry.sqlite")
        try:
            documents, chunks = len(reg.list_documents()), reg.count_chunks()
        finally:
            reg.close()
        in_use = referenced_keys(path)  # the registry's and neighbours.json's, as gc keeps them
        shared_keys = set(store.shared.keys())
        local = store.local.stats() if store.cache_locally else None
        local_keys = set(store.local.keys()) if store.cache_locally else set()
        shared = store.shared.stats()
        shared.update(referenced_here=len(in_use & shared_keys), not_referenced_here=len(shared_keys - in_use))
        out = {"documents": documents, "chunks": chunks, "referenced_keys": len(in_use),
               "missing_entries": len(in_use - shared_keys - local_keys),
               "missing_from_shared": len(in_use - shared_keys), "kv_format": store.kv_format,
               "local_cache": None if local is None else {**local, "path": str(local["path"]),
                                                          "unreferenced_entries": len(local_keys - in_use)},
               "shared": shared}
        return out
    finally:
        store.close()


def gc(path: Path, url: str, shared: bool = False, replicas: list[Path] | None = None) -> dict:
    store = open_tiered(path, url)
    try:
        in_use = referenced_keys(path)
        for r in replicas or []:
            if not (Path(r) / "corpus" / "registry.sqlite").exists():
                raise ValueError(f"--replica {r}: no registry there (corpus/registry.sqlite)")
            in_use |= referenced_keys(Path(r))
        local_removed = 0
        if store.cache_locally:
            local_removed = store.local.delete_many(sorted(set(store.local.keys()) - in_use))
        unseen = sorted(set(store.shared.keys()) - in_use)
        removed = store.shared.delete_many(unseen) if shared and unseen else 0
        out = {"removed": local_removed, "remaining": len(store.local) if store.cache_locally else 0,
               "shared_unreferenced": len(unseen), "shared_removed": removed,
               "shared_remaining": sum(1 for _ in store.shared.keys()),
               "registries": 1 + len(replicas or [])}
        if not shared and unseen:
            out["note"] = NOTE
        return out
    finally:
        store.close()
