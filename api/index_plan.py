"""What `ragblend index` knows before it computes anything: the store's recorded format and cap,
the KV bytes and time the new chunks will cost, and whether the disk and the cap can hold them."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass

from retrieval import Document, chunk_text
from store.quant import DEFAULT_FORMAT, kv_format
from store.serialize import entry_nbytes

GB = 10**9
_DISK_SLACK = 1.05  # LMDB pages and the registry/vectors beside the KV: 5% over the estimate


def apply_store_settings(service, kv_dtype: str | None, max_store_gb: float | None) -> dict:
    """Record the store's format (asked for, else the recorded one, else the default) and its cap (0 removes it), and make the service's KV cache write in that
    format; returns them. ValueError for an unknown format, or one the store's entries are not in."""
    store = service.store
    fmt = kv_format(kv_dtype).name if kv_dtype else (store.kv_format or DEFAULT_FORMAT)
    cap = {} if max_store_gb is None else {"max_bytes": None if max_store_gb == 0 else int(max_store_gb * GB)}
    if max_store_gb is not None and max_store_gb < 0:
        raise ValueError("--max-store-gb must be ≥ 0 (0 removes the cap)")
    settings = store.configure(kv_format=fmt, **cap)
    service.kv.format = kv_format(settings["kv_format"])
    return settings


@dataclass
class IndexPlan:
    kv_format: str
    documents: int
    changed_documents: int
    changed_tokens: int      # every chunk token of the changed documents: the work the progress counts
    new_chunks: int          # distinct chunks whose KV the store lacks
    new_tokens: int
    estimated_bytes: int     # their entries (header + payload) and metadata, as they will be stored
    kv_bytes_per_token: float
    estimated_seconds: float
    store_bytes: int         # counted against the cap now
    max_bytes: int | None
    free_disk_bytes: int
    # --neighbours N: a second entry per chunk, computed behind its N nearest chunks (api/neighbour_index.py)
    neighbours: int = 0
    neighbour_chunks: int = 0     # chunks that get a neighbour-aware entry this run (at most)
    neighbour_bytes: int = 0      # their entries, as stored; counted in estimated_bytes
    neighbour_seconds: float = 0.0  # their compute: each about (N + 1) prefills of the chunk; in estimated_seconds

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        cap = "no cap" if self.max_bytes is None else f"cap {self.max_bytes / GB:.3g} GB"
        nb = (f" (with neighbour-aware KV, --neighbours {self.neighbours}: up to {self.neighbour_chunks} more "
              f"entries, {self.neighbour_bytes / GB:.3g} GB, each ~{self.neighbours + 1}× a chunk's prefill, "
              f"~{self.neighbour_seconds:.0f} s)") if self.neighbours else ""
        return (f"estimate: {self.new_chunks} new chunks, {self.new_tokens} tokens × "
                f"{self.kv_bytes_per_token:,.0f} B/token ({self.kv_format}) → {self.estimated_bytes / GB:.3g} GB of KV, "
                f"~{self.estimated_seconds:.0f} s{nb}; store {self.store_bytes / GB:.3g} GB used, {cap}; "
                f"{self.free_disk_bytes / GB:.3g} GB free on disk")

    def refusal(self, allow_eviction: bool) -> str | None:
        """Why indexing must not start, or None."""
        need = self.estimated_bytes
        if self.max_bytes is not None and self.store_bytes + need > self.max_bytes:
            if not allow_eviction:
                return (f"the new chunks need ~{need / GB:.3g} GB of {self.kv_format} KV, and the store holds "
                        f"{self.store_bytes / GB:.3g} GB under its cap of {self.max_bytes / GB:.3g} GB: raise "
                        "--max-store-gb, choose a smaller --kv-dtype, or pass --allow-eviction (the least recently "
                        "used chunk KV is then evicted, and recomputed when a query needs it)")
            need = max(0, self.max_bytes - self.store_bytes)
        if need * _DISK_SLACK > self.free_disk_bytes:
            return (f"not enough disk: the new chunks need ~{need * _DISK_SLACK / GB:.3g} GB of {self.kv_format} KV, "
                    f"{self.free_disk_bytes / GB:.3g} GB is free: free space, choose a smaller --kv-dtype, or set "
                    "--max-store-gb with --allow-eviction")
        return None


def plan_index(service, docs: list[Document], neighbours: int = 0) -> IndexPlan:
    """Chunk what changed exactly as indexing will (tokenizing only), and price the chunks the
    store lacks in the store's format; the time from computing one chunk's KV and embedding it.
    With `neighbours` N, every new chunk (and, the first time, every chunk already indexed) gets
    one more entry of its size, computed behind N chunks like it: ~(N + 1)× its prefill. Chunks
    whose neighbours change because of the new ones are recomputed too; not counted here."""
    engine, kv, store = service.engine, service.kv, service.store
    shape = kv.shape
    new: dict[str, tuple[int, str]] = {}
    changed = 0
    changed_tokens = 0
    est = 0
    for doc in docs:
        if service.corpus.document_unchanged(doc, service.params):
            continue
        changed += 1
        for chunk in chunk_text(doc.id, doc.text, engine.tokenizer, service.chunk_tokens):
            ids = engine.prompts.chunk_ids(chunk.text)
            changed_tokens += len(ids)
            key = kv.key(ids)
            if key in new or store.contains(key):
                continue
            meta = {"doc_id": doc.id, "chunk_index": chunk.index, "start": chunk.start, "end": chunk.end,
                    "text": chunk.text, "n_tokens": len(ids), "position": kv.start, "fingerprint": shape.fingerprint}
            est += entry_nbytes(kv.format, shape.fingerprint, shape.n_layers, shape.n_kv_heads, len(ids), shape.head_dim)
            est += len(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            new[key] = (len(ids), chunk.text)
    tokens = sum(n for n, _ in new.values())
    payload = sum(shape.n_layers * kv.format.layer_nbytes(shape.n_kv_heads, n, shape.head_dim) for n, _ in new.values())
    usage = store.usage()
    free = shutil.disk_usage(store.path).free
    seconds = _seconds(service, list(new.values()), tokens)
    nb_chunks, nb_bytes, nb_seconds = len(new), est, 0.0
    if neighbours:
        from api.neighbour_index import recorded

        if not recorded(service.data_dir):  # turned on now: the chunks indexed before get theirs too
            old = service.corpus.registry.count_chunks()
            per = est / len(new) if new else entry_nbytes(kv.format, shape.fingerprint, shape.n_layers,
                                                          shape.n_kv_heads, service.chunk_tokens, shape.head_dim)
            nb_chunks, nb_bytes = nb_chunks + old, nb_bytes + int(per * old)
        kv_seconds = seconds / max(1, len(new))  # per new chunk, embedding included: an upper bound
        nb_seconds = nb_chunks * kv_seconds * (neighbours + 1)
    else:
        nb_chunks, nb_bytes = 0, 0
    return IndexPlan(kv.format.name, len(docs), changed, changed_tokens, len(new), tokens, est + nb_bytes,
                     payload / tokens if tokens else 0.0, seconds + nb_seconds, usage["bytes"], usage["max_bytes"], free,
                     neighbours, nb_chunks, nb_bytes, nb_seconds)


def _seconds(service, chunks: list[tuple[int, str]], tokens: int) -> float:
    """Time one chunk's KV and its embedding (the second of two runs: the first pays one-off
    costs), and scale by tokens and chunks."""
    if not chunks:
        return 0.0
    engine = service.engine
    n, text = max(chunks[: 16], key=lambda c: c[0])
    ids = engine.prompts.chunk_ids(text)
    for _ in range(2):
        t0 = time.perf_counter()
        engine.compute_chunk(engine.prompts.prefix_ids, ids)
        kv_s = time.perf_counter() - t0
    for _ in range(2):
        t0 = time.perf_counter()
        service.corpus.embedder.encode([text])
        embed_s = time.perf_counter() - t0
    return tokens * kv_s / max(1, n) + len(chunks) * embed_s
