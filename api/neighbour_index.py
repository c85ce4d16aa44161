"""The neighbour-aware index option (`ragblend index --neighbours N`, FusionRAG-style): every chunk
of the corpus gets a second KV entry computed behind its N nearest chunks (by embedding), and
`neighbours.json` in the data dir records, per chunk, which chunks those were and the entry's key.
At query time RagService serves that entry by a rule (store/neighbours.py). Composed here, from
retrieval (the neighbours), store (the key, the entries) and blend (the compute).

Three writers keep `neighbours.json`, each replacing it whole (a temp file and os.replace):
- `build`, after a CLI `ragblend index`: every chunk's neighbours found again over the corpus;
  an entry is computed only where its chunk or neighbours changed (the key covers both).
- `extend`, after an API upload's documents are committed (api/indexer.py): only the chunks
  without a valid record (the upload's, those whose neighbour was replaced or deleted) get one,
  their neighbours found over the corpus as it stands, the upload included. The chunks already
  recorded keep their entries even where a new chunk is now nearer than one of their neighbours:
  an entry's key covers its context, so it stays a correct KV of that chunk behind chunks still
  in the corpus; only the FusionRAG ideal "behind its current nearest" drifts, until the next
  `ragblend index` rebuilds. A new chunk's record is the one `build` would give it.
- `forget`, when chunks leave the corpus (a document deleted or replaced): their records, and the
  records of every chunk computed behind one of them, go, so that no entry behind a deleted chunk
  is served (those chunks get plain KV until `extend` or `build` gives them a new one).

Entries are written to the store before the file names them, and dropped after it stops naming
them: a failure in between leaves only unreferenced entries, which `store gc` removes."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retrieval.neighbours import nearest
from store.chunkkv import ChunkRef
from store.neighbours import MAX_NEIGHBOURS

NEIGHBOURS_FILE = "neighbours.json"

# A record: {"context": [neighbour plain keys, in the order they sit in front], "key": entry key}
Table = dict[str, dict]


def _chunks(service) -> tuple[list[str], list[str], object]:
    """Every distinct chunk of the registry, in chunk-id order: (plain kv keys, texts, embeddings)."""
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


def recorded(data_dir: Path) -> Table:
    """{plain kv key: {"context": [neighbour plain keys, in the order they sit in front], "key": the
    neighbour-aware entry's key}}; {} when the option was never used."""
    try:
        return json.loads((Path(data_dir) / NEIGHBOURS_FILE).read_text())
    except FileNotFoundError:
        return {}


def context_keys(data_dir: Path) -> set[str]:
    """The neighbour-aware entries' keys: referenced, though no registry row names them."""
    return {v["key"] for v in recorded(data_dir).values()}


def referenced_keys(data_dir: Path) -> set[str]:
    """Every KV key the data dir references: its registry's chunks and their neighbour-aware
    entries. What `store gc` keeps and `store stats` counts as referenced, locally and on the
    shared tier."""
    from retrieval.registry import Registry

    reg = Registry(Path(data_dir) / "corpus" / "registry.sqlite")
    try:
        return reg.kv_keys_in_use() | context_keys(data_dir)
    finally:
        reg.close()


def temp_path(data_dir: Path, pid: int | None = None) -> Path:
    """Where a process writes the table before it replaces neighbours.json (one per process)."""
    return Path(data_dir) / f".{NEIGHBOURS_FILE}.{os.getpid() if pid is None else pid}"


def _write(data_dir: Path, table: Table) -> None:
    tmp = temp_path(data_dir)
    tmp.write_text(json.dumps(table) + "\n")
    os.replace(tmp, Path(data_dir) / NEIGHBOURS_FILE)


@dataclass
class Update:
    """What `build` or `extend` did."""
    entries: int = 0            # records in the table now
    recorded: int = 0           # records new or changed (a chunk's entry behind other neighbours)
    computed: int = 0           # entries computed for them (the rest were in the store already)
    deleted: int = 0            # entries no record names any more, dropped

    def as_dict(self) -> dict:
        return {"neighbour_entries": self.entries, "neighbour_chunks": self.recorded,
                "neighbour_kv_computed": self.computed, "neighbour_kv_deleted": self.deleted}


def _check(n: int) -> None:
    if not 0 <= n <= MAX_NEIGHBOURS:
        raise ValueError(f"--neighbours must be in [0, {MAX_NEIGHBOURS}], got {n}")


def _record(service, n: int, keys: list[str], texts: list[str], emb, rows: Sequence[int],
            progress: Callable[[int, int], None] | None) -> tuple[Table, int]:
    """For each of `rows`, its n nearest other chunks of all of them, and its entry behind them
    (made sure of: computed through the KV cache, i.e. in the model's loop, when absent). A row
    with no neighbour (a corpus of one chunk) gets no record."""
    ids_of: dict[int, tuple[int, ...]] = {}

    def ids(i: int) -> tuple[int, ...]:
        if i not in ids_of:
            ids_of[i] = tuple(service.engine.prompts.chunk_ids(texts[i]))
        return ids_of[i]

    table: Table = {}
    computed = 0
    with service.kv.pipelined_writes():  # every entry written before the table that names it
        for i, near in zip(rows, nearest(emb, n, keys=keys, rows=rows)):
            if not near:
                continue
            front = list(reversed(near))  # the nearest right before the chunk
            ref = ChunkRef(ids(i), tuple(ids(j) for j in front))
            context = [keys[j] for j in front]
            key, made = service.kv.ensure(ref, {"context_of": keys[i], "context": context})
            computed += made
            table[keys[i]] = {"context": context, "key": key}
            if progress:
                progress(1, ref.n_context + len(ref.ids))
    return table, computed


def build(service, n: int, progress: Callable[[int, int], None] | None = None) -> dict:
    """Find every chunk's n nearest others, make sure each chunk's entry behind them exists
    (computed only when absent: an unchanged corpus computes nothing), record them, and drop the
    entries of contexts no longer recorded. Returns counts."""
    _check(n)
    old = recorded(service.data_dir)
    table: Table = {}
    computed = 0
    if n:
        keys, texts, emb = _chunks(service)
        table, computed = _record(service, n, keys, texts, emb, range(len(keys)), progress)
    stale = sorted({v["key"] for v in old.values()} - {v["key"] for v in table.values()})
    _write(service.data_dir, table)
    dropped = service.kv.drop(stale) if stale else 0
    return Update(len(table), sum(old.get(k) != v for k, v in table.items()), computed, dropped).as_dict()


def _valid(record: dict, live: set[str], n: int) -> bool:
    """A record `extend` keeps: its neighbours are all still in the corpus, and as many as asked."""
    return len(record["context"]) == n and all(k in live for k in record["context"])


def extend(service, n: int, serve: Callable[[Lookup | None], None],
           progress: Callable[[int, int], None] | None = None) -> Update:
    """An upload's step (see the module docstring): records for the chunks that have no valid one,
    over the corpus as it stands; the others kept as they are. Writes the table, hands `serve` its
    Lookup (a running server's NeighbourKV switches to it), then drops the entries no record
    names any more. Returns counts."""
    _check(n)
    old = recorded(service.data_dir)
    keys, texts, emb = _chunks(service)
    live = set(keys)
    kept = {k: v for k, v in old.items() if k in live and _valid(v, live, n)} if n else {}
    rows = [i for i, k in enumerate(keys) if k not in kept] if n else []
    new, computed = _record(service, n, keys, texts, emb, rows, progress) if rows else ({}, 0)
    merged = {**kept, **new}
    table = {k: merged[k] for k in keys if k in merged}  # chunk order, as build writes it
    stale = sorted({v["key"] for v in old.values()} - {v["key"] for v in table.values()})
    if table != old:
        _write(service.data_dir, table)
    serve(Lookup(service, table, keys, texts) if table else None)
    dropped = service.kv.drop(stale) if stale else 0
    return Update(len(table), sum(old.get(k) != v for k, v in new.items()), computed, dropped)


def forget(data_dir: Path, gone: Iterable[str]) -> dict[str, str]:
    """Un-record the chunks `gone` (plain keys no chunk of the corpus has any more) and every chunk
    whose context holds one: writes the table without them and returns {chunk key: entry key} of
    the records removed, whose entries the caller drops once it no longer serves them."""
    gone = set(gone)
    old = recorded(data_dir) if gone else {}
    removed = {k: v["key"] for k, v in old.items() if k in gone or not gone.isdisjoint(v["context"])}
    if removed:
        _write(data_dir, {k: v for k, v in old.items() if k not in removed})
    return removed


class Lookup:
    """A chunk's token ids → its recorded neighbours' token ids (in front order), for NeighbourKV:
    the table and the corpus's texts as read when made; `forget` removes records at once (a
    running server's delete), a new Lookup serves records added since."""

    def __init__(self, service, table: Table, keys: list[str], texts: list[str]):
        self._key = service.kv.key
        self._encode = service.engine.prompts.chunk_ids
        self.table = dict(table)
        self._text_of = dict(zip(keys, texts))
        self._ids_of: dict[str, list[int]] = {}

    def _ids(self, key: str) -> list[int] | None:
        if key not in self._ids_of and key in self._text_of:
            self._ids_of[key] = self._encode(self._text_of[key])
        return self._ids_of.get(key)

    def __call__(self, chunk: tuple[int, ...]) -> list[list[int]]:
        entry = self.table.get(self._key(chunk))
        if entry is None:
            return []
        context = [self._ids(k) for k in entry["context"]]
        return [] if any(c is None for c in context) else context  # a neighbour deleted since: plain

    def forget(self, keys: Iterable[str]) -> None:
        for k in keys:
            self.table.pop(k, None)


def lookup(service) -> Lookup | None:
    """The data dir's table as a Lookup; None when it records none."""
    table = recorded(service.data_dir)
    if not table:
        return None
    keys, texts, _ = _chunks(service)
    return Lookup(service, table, keys, texts)
