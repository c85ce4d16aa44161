"""A searchable corpus in a data directory: registry (truth) + vector index (cache) + embedder.

Write order is registry transaction first, then the index, then the index file, which records
the registry generation it reflects. A crash anywhere leaves a registry that is complete and an
index file that is either current or visibly stale (other generation, missing, or failing its
checksum); opening rebuilds a stale index from the embeddings the registry keeps. Because of
that, saving the index may be deferred (`bulk()`) without risking consistency.
"""
from __future__ import annotations

import hashlib
import re
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .chunking import Chunk
from .embed import Embedder
from .index import VectorIndex
from .loaders import Document
from .registry import Registry
from .search import BadSearch, SearchOptions, candidates_for, dedupe, fts_query, mmr_order, rrf

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite"
INDEX_FILE = "index.bin"  # one file: header (generation, kind, dim, embedder) + FAISS index


@dataclass
class Hit:
    """One retrieved chunk, with what the KV store and the prompt builder need."""

    chunk_id: int
    doc_id: str
    score: float      # cosine similarity to the question (whatever ranked the hit)
    text: str
    kv_key: str
    n_tokens: int
    index: int = 0            # the chunk's number in its document, from 0
    doc_chunks: int = 0       # its document's chunk count
    page: int | None = None   # PDF: the page the chunk starts on
    source: str | None = None


_LINE = re.compile(r"(.+\.jsonl):\d+", re.IGNORECASE)


def _origin(source: str | None) -> str:
    """The file a source names (a JSONL line's source is `file:line`), absolute."""
    source = source or ""
    if source == "api" or source.startswith("upload:"):
        return source
    m = _LINE.fullmatch(source)
    return str(Path(m.group(1) if m else source).resolve())


def _same_origin(a: str | None, b: str | None) -> bool:
    return _origin(a) == _origin(b)


def _still_there(source: str | None) -> bool:
    """Whether the document a stored source names still exists: a file on disk, or (added
    through the API) the document itself, which no file replaces."""
    origin = _origin(source)
    return not origin.startswith("/") or Path(origin).exists()


def content_hash(text: str, params: str) -> str:
    """Identity of a document's indexed form: its text and how it was chunked (size, tokenizer)."""
    return hashlib.sha256(f"{params}\x00{text}".encode()).hexdigest()


class Reranker(Protocol):
    """Orders candidates by relevance to a query (a cross-encoder: retrieval/rerank.py)."""

    def rank(self, query: str, texts: list[str], ids: list[int]) -> list[int]: ...


def _hit(row: dict, score: float) -> Hit:
    return Hit(chunk_id=row["chunk_id"], doc_id=row["doc_id"], score=score, text=row["text"], kv_key=row["kv_key"],
               n_tokens=row["n_tokens"], index=row["idx"], doc_chunks=row["doc_chunks"], page=row["page"],
               source=row["source"])


class Corpus:
    """Upsert, delete and search documents; queries see the corpus before or after a change."""

    def __init__(self, data_dir: str | Path, embedder: Embedder, index_kind: str = "flat"):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.embedder, self.index_kind = embedder, index_kind
        self.registry = Registry(self.data_dir / REGISTRY_FILE)
        self._index_path = self.data_dir / INDEX_FILE
        self._lock = threading.RLock()
        self._bulk_depth = 0  # > 0 while inside bulk(): index saves are deferred
        recorded = self.registry.get_meta("embedder")
        if recorded is not None and recorded != embedder.name and self.registry.count_chunks():
            raise ValueError(f"{self.data_dir} was embedded with {recorded!r}, not {embedder.name!r}; "
                             "open it with that embedder or re-index into a new directory")
        self._index, self._generation = self._open_index()

    def __len__(self) -> int:
        return self.registry.count_chunks()

    def close(self) -> None:
        self.registry.close()

    def document_unchanged(self, doc: Document, params: str) -> bool:
        """True when `doc` is stored with the same text and chunking params: nothing to recompute."""
        stored = self.registry.get_document(doc.id)
        return stored is not None and stored["content_hash"] == content_hash(doc.text, params)

    def collisions(self, docs: list[Document]) -> tuple[list[Document], list[dict]]:
        """Split file documents about to be indexed into those that may take their id and those
        whose id already names a different document: another document of the same batch, or
        one indexed before from another file that still exists, or one added through the API.
        A file that moved (its old path is gone) takes its id over; so does a changed line of
        the same JSONL file. Colliding documents are never written over, only reported."""
        kept: list[Document] = []
        collided: list[dict] = []
        batch: dict[str, str] = {}
        for doc in docs:
            if doc.id in batch:
                collided.append({"id": doc.id, "source": doc.source, "taken_by": batch[doc.id]})
                continue
            stored = self.registry.get_document(doc.id)
            old = stored["source"] if stored else None
            if old is not None and not _same_origin(old, doc.source) and _still_there(old):
                collided.append({"id": doc.id, "source": doc.source, "taken_by": old})
                continue
            batch[doc.id] = doc.source
            kept.append(doc)
        return kept, collided

    def upsert(self, doc: Document, chunks: list[Chunk], kv_keys: list[str], embeddings: np.ndarray,
               params: str) -> list[str]:
        """Store or replace `doc`; returns kv keys its old chunks used that no chunk uses any more."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if len(chunks) == 0:
            embeddings = embeddings.reshape(0, embeddings.shape[-1] if embeddings.ndim == 2 else 0)
        with self._lock:
            if self._index is not None and len(chunks) and embeddings.shape[1] != self._index.dim:
                raise ValueError(f"embeddings of dim {embeddings.shape[1]}, index has {self._index.dim}")
            old_keys = {c["kv_key"] for c in self.registry.chunks_of(doc.id)}
            old, new = self.registry.replace_document(doc, content_hash(doc.text, params), chunks,
                                                      kv_keys, embeddings)
            if len(chunks) and self.registry.get_meta("embedder") is None:
                self.registry.set_meta("embedder", self.embedder.name)
            self._apply(old, new, embeddings)
            return sorted(old_keys - self.registry.kv_keys_referenced(old_keys))

    def delete(self, doc_id: str) -> list[str] | None:
        """Remove a document's rows and vectors; returns its kv keys no chunk uses any more."""
        with self._lock:
            keys = {c["kv_key"] for c in self.registry.chunks_of(doc_id)}
            removed = self.registry.delete_document(doc_id)
            if removed is None:
                return None
            self._apply(removed, [], np.zeros((0, 0), dtype=np.float32))
            return sorted(keys - self.registry.kv_keys_referenced(keys))

    def search(self, query: str, k: int = 5, options: SearchOptions | None = None,
               reranker: Reranker | None = None) -> list[Hit]:
        """The k chunks for `query`, best first, as `options` ask (retrieval/search.py): dense
        (the default), BM25 or both fused; filtered before the cut; one slot per passage;
        optionally reranked (needs `reranker`) or diversified; none under `min_score`."""
        options = options or SearchOptions()
        if options.rerank and reranker is None:
            raise BadSearch("rerank", "no reranker on this server (serve --reranker PATH)")
        vec = self.embedder.encode([query])[0]  # outside the lock: slow and touches no shared state
        n = candidates_for(k)
        with self._lock:
            if self.registry.generation != self._generation:  # another process changed the corpus
                self._index, self._generation = self._open_index()
            if self._index is None or k <= 0:
                return []
            condition, args = options.filter.sql()
            allowed = None if options.filter.empty else self.registry.chunk_ids_where(condition, args)
            rankings = []
            if options.retrieval in ("dense", "hybrid"):
                scores, ids = self._index.search(np.asarray(vec, dtype=np.float32).reshape(1, -1), n, allowed)
                rankings.append([int(i) for i in ids[0] if i >= 0])
            if options.retrieval in ("bm25", "hybrid"):
                match = fts_query(query)
                rankings.append(self.registry.bm25(match, n, condition, args) if match else [])
            order = rrf(rankings) if len(rankings) > 1 else rankings[0]
            rows = {r["chunk_id"]: r for r in self.registry.get_chunks(order)}
            order = dedupe([i for i in order if i in rows], {i: r["text"] for i, r in rows.items()})
            vectors = self.registry.embeddings_of(order) if order else np.zeros((0, len(vec)), dtype=np.float32)
        cosine = dict(zip(order, (vectors @ vec).tolist()))
        if options.rerank:
            order = reranker.rank(query, [rows[i]["text"] for i in order], order)
        if options.mmr is not None and order:
            row_of = {i: j for j, i in enumerate(cosine)}  # the vectors' rows, in fetch order
            order = [order[j] for j in mmr_order(vec, vectors[[row_of[i] for i in order]], len(order), options.mmr)]
        if options.min_score is not None:
            order = [i for i in order if cosine[i] >= options.min_score]
        return [_hit(rows[i], cosine[i]) for i in order[:k]]

    def search_vector(self, vec: np.ndarray, k: int = 5) -> list[Hit]:
        """The k chunks nearest `vec` in the dense index alone (no fusion, dedupe or filter)."""
        with self._lock:
            if self.registry.generation != self._generation:
                self._index, self._generation = self._open_index()
            if self._index is None or k <= 0:
                return []
            scores, ids = self._index.search(np.asarray(vec, dtype=np.float32).reshape(1, -1), k)
            score_of = {int(i): float(s) for i, s in zip(ids[0], scores[0]) if i >= 0}
            rows = self.registry.get_chunks(score_of)
        return [_hit(r, score_of[r["chunk_id"]]) for r in rows]

    @contextmanager
    def bulk(self) -> Iterator["Corpus"]:
        """Defer saving the index file to the end of a batch of upserts (one write, not one per doc).

        The lock is not held across the batch, so queries keep being served between upserts.
        """
        with self._lock:
            self._bulk_depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._bulk_depth -= 1
                if self._bulk_depth == 0:
                    self.save()

    def save(self) -> None:
        """Write the index file, tagged with the registry generation it reflects."""
        with self._lock:
            if self._index is None:
                self._index_path.unlink(missing_ok=True)
                return
            self._index.meta = {"generation": self._generation, "kind": self._index.kind,
                                "dim": self._index.dim, "embedder": self.embedder.name}
            self._index.save(self._index_path)

    def _apply(self, old: list[int], new: list[int], embeddings: np.ndarray) -> None:
        """Mirror a committed registry change into the index, then persist it."""
        generation = self.registry.committed_generation
        if generation != self._generation + 1:
            # Another process wrote in between, so this index misses its change: start over.
            self._index, self._generation = self._rebuild()
            if self._bulk_depth == 0:
                self.save()
            return
        try:
            if self._index is None and new:
                self._index = VectorIndex(embeddings.shape[1], self.index_kind)
            if self._index is not None:
                self._index.remove(np.array(old, dtype=np.int64))
                self._index.add(np.array(new, dtype=np.int64), embeddings)
        except Exception:
            # The registry already holds the change; an index that failed halfway is rebuilt.
            self._index, self._generation = self._rebuild()
            raise
        self._generation = generation
        if self._bulk_depth == 0:
            self.save()

    def _open_index(self) -> tuple[VectorIndex | None, int]:
        """Load the saved index if it matches the registry, else rebuild it (and save)."""
        try:
            index = VectorIndex.load(self._index_path)
            meta = index.meta
            if (meta.get("generation") == self.registry.generation and meta.get("kind") == self.index_kind
                    and meta.get("embedder") == self.embedder.name):
                return index, meta["generation"]
            log.warning("index %s is stale (generation %s, registry %s); rebuilding",
                        self._index_path, meta.get("generation"), self.registry.generation)
        except FileNotFoundError:
            if self.registry.count_chunks():
                log.warning("index %s is missing; rebuilding from the registry", self._index_path)
        except Exception as e:  # corrupt or unreadable: the registry has everything to rebuild
            log.warning("index %s is unreadable (%s); rebuilding from the registry", self._index_path, e)
        index, generation = self._rebuild()
        self._index, self._generation = index, generation
        self.save()
        return index, generation

    def _rebuild(self) -> tuple[VectorIndex | None, int]:
        generation, ids, vecs = self.registry.embeddings_snapshot()
        if len(ids) == 0:
            return None, generation
        index = VectorIndex(vecs.shape[1], self.index_kind)
        index.add(ids, vecs)
        return index, generation
