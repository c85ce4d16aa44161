"""RagService: composes retrieval (text → chunks → ids), store (chunk KV bytes) and blend (the
engine) into the two jobs users run — index a corpus, answer a question from it."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from api.datadir import recorded_neighbours
from api.neighbour_index import NEIGHBOURS_FILE, Lookup, extend, forget, lookup
from blend.engine import Engine, Generation
from blend.prompt import Layout
from blend.loader import load_model
from blend.spec import QuerySpec
from retrieval import Corpus, Document, Embedder, chunk_text
from retrieval.corpus import Hit, Reranker
from retrieval.search import SearchOptions
from store.backend import open_kv_store
from store.neighbours import DEFAULT_NEIGHBOUR_RULE, NeighbourKV, check_rule
from store.tiers import ChunkKVSource, tier_budgets

log = logging.getLogger(__name__)
DEFAULT_CHUNK_TOKENS = 384


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(os.environ.get("RAGBLEND_DATA", Path(base) / "ragblend"))


def remove_document(corpus: Corpus, doc_id: str, drop_kv: Callable[[list[str]], int],
                    forget_neighbours: Callable[[list[str]], int] | None = None) -> int | None:
    """Registry rows and vectors first (one commit), then the KV no chunk references any more,
    then the neighbour-aware entries of those chunks and of the chunks computed behind them
    (`forget_neighbours`, api/neighbour_index.forget): a crash in between leaves only unreferenced
    KV, never a chunk without its KV. Returns the entries dropped."""
    stale = corpus.delete(doc_id)
    if stale is None:
        return None
    return drop_kv(stale) + (forget_neighbours(stale) if forget_neighbours and stale else 0)


@dataclass
class IndexReport:
    documents: int = 0
    unchanged: int = 0
    chunks: int = 0
    tokens: int = 0
    kv_computed: int = 0
    kv_deleted: int = 0
    # --neighbours N (api/neighbour_index.py): chunks this run recorded a neighbour-aware entry for
    # (new, or behind other neighbours), the entries it computed for them (the rest were stored),
    # and those it dropped (of chunks gone, or computed behind one)
    neighbour_chunks: int = 0
    neighbour_kv_computed: int = 0
    neighbour_kv_deleted: int = 0
    neighbour_seconds: float = 0.0  # the CLI's neighbour step (after the documents' `seconds`)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    committed: int = 0  # documents stored or found unchanged: what an interrupted run keeps

    def as_dict(self) -> dict:
        return {"documents": self.documents, "unchanged": self.unchanged, "chunks": self.chunks,
                "tokens": self.tokens, "kv_computed": self.kv_computed, "kv_deleted": self.kv_deleted,
                "neighbour_chunks": self.neighbour_chunks, "neighbour_kv_computed": self.neighbour_kv_computed,
                "neighbour_kv_deleted": self.neighbour_kv_deleted, "neighbour_seconds": round(self.neighbour_seconds, 3),
                "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "chunks_per_s": round(self.chunks / self.seconds, 3) if self.seconds else None,
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None}


@dataclass
class Retrieved:
    hits: list[Hit]
    retrieve_ms: float


class RagService:
    """One model, one chunk-KV cache (its tiers over the data dir's LMDB store), one corpus. Thread
    safe for one writer and many readers. The model is the engine's alone: a chunk's KV for
    indexing is work queued in the engine's loop, beside the answers (blend/scheduler.py)."""

    def __init__(self, data_dir: str | Path | None = None, *, model: str = "default", device: str = "cpu",
                 dtype: str = "float32", chunk_tokens: int = DEFAULT_CHUNK_TOKENS, index_kind: str = "flat",
                 hot_bytes: int | None = None, pinned_bytes: int | None = None, engine: Engine | None = None,
                 embedder: Embedder | None = None, kv_store: str | None = None,
                 neighbour_rule: str = DEFAULT_NEIGHBOUR_RULE):
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine or Engine(load_model(model, device=device, dtype=dtype))
        if self.engine.tokenizer is None:
            raise ValueError("the service needs a model with a tokenizer")
        self.chunk_tokens = chunk_tokens
        # `kv_store`: a shared tier's URL (redis://…, store/backend.py), behind the data dir's
        # LMDB as a local cache; None: the data dir's LMDB alone
        self.store = open_kv_store(self.data_dir / "kv", kv_store)
        try:
            self.corpus = Corpus(self.data_dir / "corpus", embedder or Embedder(), index_kind=index_kind)
        except BaseException:
            self.store.close()
            raise
        # the hot tiers: sized from the machine's free memory unless told (store.tiers.tier_budgets)
        sized = tier_budgets(self.engine.device)
        self.kv = self.engine.kv_cache(store=self.store, gpu_bytes=sized[0] if hot_bytes is None else hot_bytes,
                                       cpu_bytes=sized[1] if pinned_bytes is None else pinned_bytes)
        self.write_lock = threading.Lock()
        self.neighbour_rule = check_rule(neighbour_rule)
        self._source: ChunkKVSource = self.kv
        self.neighbours: Lookup | None = None
        self._served_stamp: tuple[int, int, int] | None = None  # neighbours.json as last served
        self._reload_lock = threading.Lock()
        self.load_neighbours()
        self.reranker: Reranker | None = None  # a cross-encoder (retrieval/rerank.py), when one is given

    def load_neighbours(self) -> bool:
        """Serve neighbour-aware chunk KV (api/neighbour_index.py) where the data dir records it, by
        this service's rule; plain entries otherwise. Returns whether it does."""
        stamp = _stamp(self.data_dir)
        served = self._serve_neighbours(lookup(self))
        self._served_stamp = stamp  # what was read, even if the file changed while reading it
        return served

    @property
    def source(self) -> ChunkKVSource:
        """What a query reads its chunk KV from (a query reads it once: it is served by the old
        table or the new one, whole). When neighbours.json changed on disk since it was served —
        another process (`ragblend index`) rebuilt the table, as it may rebuild the corpus, which
        Corpus reloads likewise — the table is reloaded first: a stat per query."""
        if _stamp(self.data_dir) != self._served_stamp:
            with self._reload_lock:
                if _stamp(self.data_dir) != self._served_stamp:
                    log.info("neighbours.json changed on disk: reloading the neighbour-aware KV table")
                    self.load_neighbours()
        return self._source

    def _serve_neighbours(self, table: Lookup | None) -> bool:
        stamp = _stamp(self.data_dir)  # before reading it: a change after this one is seen next time
        self.neighbours = table
        self._source = self.kv if table is None else NeighbourKV(self.kv, table, self.neighbour_rule)
        self._served_stamp = stamp
        return table is not None

    def index_neighbours(self, report: IndexReport) -> None:
        """An upload's neighbour step (api/indexer.py, once its documents are committed): where the
        data dir records --neighbours N ≥ 1, the chunks without a neighbour-aware entry (the
        upload's) get theirs behind their N nearest chunks of the corpus as it stands, computed in
        the model's loop like their plain KV, written to the store, then recorded in
        neighbours.json and served from then on (api/neighbour_index.extend). N = 0: nothing."""
        n = recorded_neighbours(self.data_dir)
        if not n:
            return
        with self.write_lock:
            done = extend(self, n, self._serve_neighbours)
        report.neighbour_chunks += done.recorded
        report.neighbour_kv_computed += done.computed
        report.neighbour_kv_deleted += done.deleted

    def forget_neighbours(self, gone: list[str]) -> int:
        """The neighbour-aware entries of chunks that left the corpus (plain keys `gone`) and of the
        chunks computed behind one: un-recorded, no longer served, then dropped. Returns how many
        entries the store held."""
        removed = forget(self.data_dir, gone)
        if not removed:
            return 0
        if self.neighbours is not None:
            self.neighbours.forget(removed)
            self._served_stamp = _stamp(self.data_dir)  # our own write, served as it stands
        return self.kv.drop(list(removed.values()))

    def close(self) -> None:
        self.kv.close()
        self.corpus.close()
        self.store.close()

    @property
    def params(self) -> str:
        """What a document's chunks and KV depend on, besides its text."""
        return f"chunk_tokens={self.chunk_tokens};model={self.engine.fingerprint}"

    # -- indexing ------------------------------------------------------------------------------
    def index_documents(self, docs: Iterable[Document], progress: Callable[[int, int], None] | None = None,
                        report: IndexReport | None = None) -> IndexReport:
        """Chunk, precompute KV (only for chunks not stored yet), embed, then commit each document.
        `report`, when given, is filled as it goes (what an interrupted run had done).

        KV entries are written before the registry commit: a crash leaves at most unreferenced KV
        (reused by the next run), never a registry row whose KV is missing."""
        report = report if report is not None else IndexReport()
        t0 = time.perf_counter()
        for doc in docs:
            self.index_document(doc, report, progress)
        report.seconds = time.perf_counter() - t0
        return report

    def index_document(self, doc: Document, report: IndexReport | None = None,
                       progress: Callable[[int, int], None] | None = None) -> IndexReport:
        report = report or IndexReport()
        with self.write_lock:
            report.documents += 1
            if self.corpus.document_unchanged(doc, self.params):
                report.unchanged += 1
                report.committed += 1
                return report
            chunks = chunk_text(doc.id, doc.text, self.engine.tokenizer, self.chunk_tokens)
            keys = []
            with self.kv.pipelined_writes():  # every entry written before the commit below
                for chunk in chunks:
                    ids = self.engine.prompts.chunk_ids(chunk.text)
                    meta = {"doc_id": doc.id, "chunk_index": chunk.index, "start": chunk.start, "end": chunk.end,
                            "text": chunk.text}
                    key, computed = self.kv.ensure(ids, meta)  # a computed chunk is queued in the model's loop
                    keys.append(key)
                    report.kv_computed += computed
                    report.chunks += 1
                    report.tokens += len(ids)
                    if progress:
                        progress(1, len(ids))
            self.commit_document(doc, chunks, keys, self.corpus.embedder.encode([c.text for c in chunks]), report)
        return report

    def commit_document(self, doc: Document, chunks: list, keys: list[str], embeddings, report: IndexReport) -> None:
        """A document's registry rows and vectors in one commit (its chunks' KV already stored),
        then the KV its old chunks no longer need dropped. Called under write_lock, by
        index_document and by `index --ray`'s driver (api/ray_index.py)."""
        stale = self.corpus.upsert(doc, chunks, keys, embeddings, self.params)
        report.committed += 1
        report.kv_deleted += self.kv.drop(stale)
        if stale:  # a replaced document's old chunks: no entry behind them is served any more
            report.neighbour_kv_deleted += self.forget_neighbours(stale)

    def prune(self, roots: Iterable[str | Path], loaded: Iterable[Document]) -> list[str]:
        """Delete what was indexed from files under `roots` (directories, or files) that this run
        no longer finds: a file that is gone, or a line gone from a JSONL file read again
        (`loaded`: what this run read). Documents added through the API are never touched.
        Returns the ids deleted."""
        from retrieval.corpus import _origin

        roots = [Path(r).resolve() for r in roots]
        loaded = list(loaded)
        present = {d.id for d in loaded}
        reread = {_origin(d.source) for d in loaded}
        removed = []
        for row in self.corpus.registry.list_documents():
            origin = _origin(row["source"])
            if not origin.startswith("/"):
                continue
            path = Path(origin)
            if not any(path == r or path.is_relative_to(r) for r in roots):
                continue
            line_gone = origin in reread and row["doc_id"] not in present and row["source"] != origin
            if (not path.exists() or line_gone) and self.delete_document(row["doc_id"]):
                removed.append(row["doc_id"])
        return removed

    def delete_document(self, doc_id: str) -> bool:
        with self.write_lock:
            return remove_document(self.corpus, doc_id, self.kv.drop, self.forget_neighbours) is not None

    # -- answering -----------------------------------------------------------------------------
    def retrieve(self, question: str, top_k: int, options: SearchOptions | None = None) -> Retrieved:
        """Raises BadSearch for what the caller must change (a reranker this service lacks)."""
        t0 = time.perf_counter()
        hits = self.corpus.search(question, top_k, options, self.reranker)
        return Retrieved(hits, (time.perf_counter() - t0) * 1e3)

    def answer(self, question: str, hits: list[Hit], spec: QuerySpec) -> Generation:
        """The engine's one query path over this service's KV cache (iterating the Generation
        steps the engine's loop, or waits for it while it serves)."""
        return self.engine.generate(self.layout(question, hits), spec, self.source)

    def layout(self, question: str, hits: list[Hit]) -> Layout:
        """The prompt of `question` over `hits` (best first), which it lists in reverse: the best
        chunk sits right before the question, where a small model attends to it most."""
        return self.engine.layout(question, [h.text for h in reversed(hits)])


def _stamp(data_dir: Path) -> tuple[int, int, int] | None:
    """neighbours.json's identity on disk (it is replaced whole, never edited): None when absent."""
    try:
        st = os.stat(Path(data_dir) / NEIGHBOURS_FILE)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
