"""The neighbour-aware index option (`ragblend index --neighbours N`, FusionRAG-style): after the
documents are indexed, every chunk of the corpus gets a second KV entry computed behind its N
nearest chunks (by embedding), and `neighbours.json` in the data dir records, per chunk, which
chunks those were and the entry's key. At query time RagService serves that entry by a rule
(store/neighbours.py). Composed here, from retrieval (the neighbours), store (the key, the
entries) and blend (the compute)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from retrieval.neighbours import nearest
from store.chunkkv import ChunkRef
from store.neighbours import MAX_NEIGHBOURS, Neighbours

NEIGHBOURS_FILE = "neighbours.json"


def _chunks(service) -> tuple[list[str], list[str], object]:
    """Every distinct chunk of the registry: (plain kv keys, texts, embeddings)."""
    reg = service.corpus.registry
    ids, emb = reg.all_embeddings()
    rows = reg.get_chunks([int(i) for i in ids])
    keys, texts, keep = [], [], []
    seen: set[str] = set()
    for i, r in enumerate(rows):
        if r["kv_key"] not in seen:
            seen.add(r["kv_key"])
            keys.append(r["kv_key"])
            texts.append(r["text"])
            keep.append(i)
    return keys, texts, emb[keep] if len(keep) else emb


def recorded(data_dir: Path) -> dict:
    """{plain kv key: {"context": [neighbour plain keys, in the order they sit in front], "key": the
    neighbour-aware entry's key}}; {} when the option was never used."""
    try:
        return json.loads((Path(data_dir) / NEIGHBOURS_FILE).read_text())
    except FileNotFoundError:
        return {}


def context_keys(data_dir: Path) -> set[str]:
    """The neighbour-aware entries' keys: referenced, though no registry row names them."""
    return {v["key"] for v in recorded(data_dir).values()}


def build(service, n: int, progress: Callable[[int, int], None] | None = None) -> dict:
    """Find every chunk's n nearest others, make sure each chunk's entry behind them exists
    (computed only when absent: an unchanged corpus computes nothing), record them, and drop the
    entries of contexts no longer recorded. Returns counts."""
    if not 0 <= n <= MAX_NEIGHBOURS:
        raise ValueError(f"--neighbours must be in [0, {MAX_NEIGHBOURS}], got {n}")
    old = recorded(service.data_dir)
    table: dict[str, dict] = {}
    computed = 0
    if n:
        keys, texts, emb = _chunks(service)
        ids = [service.engine.prompts.chunk_ids(t) for t in texts]
        for i, near in enumerate(nearest(emb, n, keys=keys)):
            if not near:
                continue
            front = list(reversed(near))  # the nearest right before the chunk
            ref = ChunkRef(tuple(ids[i]), tuple(tuple(ids[j]) for j in front))
            key, made = service.kv.ensure(ref, {"context_of": keys[i], "context": [keys[j] for j in front]})
            computed += made
            table[keys[i]] = {"context": [keys[j] for j in front], "key": key}
            if progress:
                progress(1, ref.n_context + len(ref.ids))
    stale = sorted({v["key"] for v in old.values()} - {v["key"] for v in table.values()})
    path = Path(service.data_dir) / NEIGHBOURS_FILE
    tmp = path.with_name(f".{NEIGHBOURS_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(table) + "\n")
    os.replace(tmp, path)
    dropped = service.kv.drop(stale) if stale else 0
    return {"neighbour_entries": len(table), "neighbour_kv_computed": computed, "neighbour_kv_deleted": dropped}


def lookup(service) -> Neighbours | None:
    """A chunk's token ids → its recorded neighbours' token ids (in front order), for NeighbourKV;
    None when the data dir records none."""
    table = recorded(service.data_dir)
    if not table:
        return None
    keys, texts, _ = _chunks(service)
    text_of = dict(zip(keys, texts))
    ids_of: dict[str, list[int]] = {}

    def ids(key: str) -> list[int] | None:
        if key not in ids_of and key in text_of:
            ids_of[key] = service.engine.prompts.chunk_ids(text_of[key])
        return ids_of.get(key)

    def neighbours(chunk: tuple[int, ...]) -> list[list[int]]:
        entry = table.get(service.kv.key(chunk))
        if entry is None:
            return []
        context = [ids(k) for k in entry["context"]]
        return [] if any(c is None for c in context) else context  # a neighbour deleted since: plain
    return neighbours
