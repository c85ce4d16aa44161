"""RagService: composes retrieval (text → chunks → ids), store (chunk KV bytes) and blend (the
engine) into the two jobs users run — index a corpus, answer a question from it."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blend.decode import Sampling
from blend.engine import Answer, Engine, Generation, KVSource
from blend.kv import ArrivingKV, ChunkKV
from blend.loader import load_model
from blend.prefill import BlendConfig
from blend.sources import StreamingStoreSource
from retrieval import Corpus, Document, Embedder, chunk_text
from retrieval.corpus import Hit
from store import CorruptEntry, FingerprintMismatch, HotTier, KVStore, StagedReader

log = logging.getLogger(__name__)
DEFAULT_CHUNK_TOKENS = 384


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(os.environ.get("RAGBLEND_DATA", Path(base) / "ragblend"))


def drop_kv(store: KVStore, keys: list[str], hot: HotTier | None = None) -> int:
    for key in keys:
        if hot is not None:
            hot.pop(key)
    return store.delete_many(keys) if keys else 0


def remove_document(corpus: Corpus, store: KVStore, doc_id: str, hot: HotTier | None = None) -> int | None:
    """Registry rows and vectors first (one commit), then the KV no chunk references any more:
    a crash in between leaves only unreferenced KV, never a chunk without its KV."""
    stale = corpus.delete(doc_id)
    return None if stale is None else drop_kv(store, stale, hot)


@dataclass
class IndexReport:
    documents: int = 0
    unchanged: int = 0
    chunks: int = 0
    tokens: int = 0
    kv_computed: int = 0
    kv_deleted: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"documents": self.documents, "unchanged": self.unchanged, "chunks": self.chunks,
                "tokens": self.tokens, "kv_computed": self.kv_computed, "kv_deleted": self.kv_deleted,
                "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "chunks_per_s": round(self.chunks / self.seconds, 3) if self.seconds else None,
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None}


@dataclass
class Retrieved:
    hits: list[Hit]
    retrieve_ms: float


class RagService:
    """One model, one store, one corpus in a data directory. Thread-safe for one writer and
    many readers; the model itself is used by one request at a time (`model_lock`)."""

    def __init__(self, data_dir: str | Path | None = None, *, model: str = "default", device: str = "cpu",
                 dtype: str = "float32", chunk_tokens: int = DEFAULT_CHUNK_TOKENS, index_kind: str = "flat",
                 hot_bytes: int = 1 << 30, engine: Engine | None = None, embedder: Embedder | None = None):
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine or Engine(load_model(model, device=device, dtype=dtype))
        if self.engine.tokenizer is None:
            raise ValueError("the service needs a model with a tokenizer")
        self.chunk_tokens = chunk_tokens
        self.store = KVStore(self.data_dir / "kv")
        self.corpus = Corpus(self.data_dir / "corpus", embedder or Embedder(), index_kind=index_kind)
        self.hot = HotTier(hot_bytes, device=self.engine.device)
        # On CUDA, a request's cold chunks stream from LMDB into the prefill layer by layer.
        self.reader = StagedReader(self.store) if self.engine.device.type == "cuda" else None
        # Reentrant: a query holds it while generating, and its KV source takes it again to
        # recompute a chunk whose KV is missing, corrupt or of another model.
        self.model_lock = threading.RLock()
        self.write_lock = threading.Lock()
        self.kv_recomputed = 0  # entries found corrupt, stale or missing at query time

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.corpus.close()
        self.store.close()

    @property
    def params(self) -> str:
        """What a document's chunks and KV depend on, besides its text."""
        return f"chunk_tokens={self.chunk_tokens};model={self.engine.fingerprint}"

    # -- indexing ------------------------------------------------------------------------------
    def index_documents(self, docs: Iterable[Document], progress: Callable[[int, int], None] | None = None) -> IndexReport:
        """Chunk, precompute KV (only for chunks not stored yet), embed, then commit each document.

        KV entries are written before the registry commit: a crash leaves at most unreferenced KV
        (reused by the next run), never a registry row whose KV is missing."""
        report = IndexReport()
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
                return report
            chunks = chunk_text(doc.id, doc.text, self.engine.tokenizer, self.chunk_tokens)
            prefix = self.engine.prompts.prefix_ids
            keys = []
            for chunk in chunks:
                ids = self.engine.prompts.chunk_ids(chunk.text)
                key = self.engine.chunk_key(prefix, ids)
                keys.append(key)
                if not self.store.contains(key):
                    self._compute_and_put(key, ids, {"doc_id": doc.id, "chunk_index": chunk.index,
                                                     "start": chunk.start, "end": chunk.end, "text": chunk.text})
                    report.kv_computed += 1
                report.chunks += 1
                report.tokens += len(ids)
                if progress:
                    progress(1, len(ids))
            embeddings = self.corpus.embedder.encode([c.text for c in chunks])
            stale = self.corpus.upsert(doc, chunks, keys, embeddings, self.params)
            report.kv_deleted += self._drop_kv(stale)
        return report

    def delete_document(self, doc_id: str) -> bool:
        with self.write_lock:
            return remove_document(self.corpus, self.store, doc_id, self.hot) is not None

    def _drop_kv(self, keys: list[str]) -> int:
        return drop_kv(self.store, keys, self.hot)

    def _compute_and_put(self, key: str, ids: list[int], meta: dict) -> torch.Tensor:
        with self.model_lock:
            ckv = self.engine.compute_chunk(self.engine.prompts.prefix_ids, ids)
        meta = {**meta, "n_tokens": len(ids), "position": ckv.start, "fingerprint": self.engine.fingerprint}
        self.store.put(key, ckv.kv.cpu(), self.engine.fingerprint, meta)
        return ckv.kv

    # -- answering -----------------------------------------------------------------------------
    def kv_source(self, key: str, ids: list[int]) -> ChunkKV:
        """Hot tier, then LMDB; an entry that is missing, corrupt or of another model is
        recomputed and rewritten, never used."""
        start = len(self.engine.prompts.prefix_ids)
        kv = self.hot.get(key)
        if kv is None:
            try:
                kv = self.store.get(key, fingerprint=self.engine.fingerprint)
                if kv is not None and not self._fits(tuple(kv.shape), kv.dtype, len(ids)):
                    log.warning("chunk %s: stored shape %s/%s does not fit the model; recomputing",
                                key[:12], tuple(kv.shape), kv.dtype)
                    kv = None
            except (CorruptEntry, FingerprintMismatch) as e:
                log.warning("chunk %s unusable (%s); recomputing", key[:12], e)
                kv = None
            if kv is None:
                self.kv_recomputed += 1
                kv = self._compute_and_put(key, ids, {"recomputed_at_query": True})
            kv = self.hot.put(key, kv)
        return ChunkKV(kv, start)

    def _fits(self, shape: tuple[int, ...], dtype: torch.dtype, n_tokens: int) -> bool:
        p = self.engine.parts
        return shape == (p.n_layers, 2, p.n_kv_heads, n_tokens, p.head_dim) and dtype == p.dtype

    def kv_stream(self, keys: list[str], ids_list: list[list[int]], layers: list[int]) -> list[ChunkKV] | ArrivingKV:
        """A request's chunks for the streamed prefill (CUDA): from the hot tier when all are
        there, else read from LMDB layer by layer as the prefill consumes them. Entries that are
        missing, of another model or with a bad header are recomputed first; a layer failing its
        checksum mid-stream fails the prefill, and `answer` retries through kv_source."""
        start = len(self.engine.prompts.prefix_ids)
        hot = [self.hot.get(k) for k in keys]
        if all(t is not None for t in hot):
            return [ChunkKV(t, start) for t in hot]
        for key, ids in zip(keys, ids_list):
            try:
                head = self.store.header(key)
                usable = (head is not None and head.fingerprint == self.engine.fingerprint
                          and self._fits(head.shape, head.dtype, len(ids)))
            except CorruptEntry as e:
                log.warning("chunk %s unusable (%s); recomputing", key[:12], e)
                usable = False
            if not usable:
                self.kv_recomputed += 1
                self._compute_and_put(key, ids, {"recomputed_at_query": True})
        return StreamingStoreSource(self.reader, self.engine.fingerprint, start).stream(keys, ids_list, layers)

    def retrieve(self, question: str, top_k: int) -> Retrieved:
        t0 = time.perf_counter()
        hits = self.corpus.search(question, top_k)
        return Retrieved(hits, (time.perf_counter() - t0) * 1e3)

    def answer(self, question: str, hits: list[Hit], *, mode: str = "blend", blend: BlendConfig | None = None,
               max_tokens: int = 64, sampling: Sampling = Sampling()) -> Generation:
        """The caller iterates the Generation while holding `model_lock` (one request at a time)."""
        layout = self.engine.layout(question, [h.text for h in hits])

        def run(source: KVSource) -> Generation:
            return self.engine.generate(layout, mode=mode, blend=blend, max_tokens=max_tokens,
                                        sampling=sampling, source=source, keys=[h.kv_key for h in hits])

        if self.reader is None:
            return run(self.kv_source)
        return Generation(self._streamed(run))

    def _streamed(self, run: Callable[[KVSource], Generation]) -> Generator[str, None, Answer | None]:
        """The request with its cold chunks streamed; if a streamed layer fails its checksum
        (found during the prefill, before any text) or an entry changed since it was checked,
        again through kv_source, which recomputes whatever is corrupt or missing."""
        gen = run(_StreamedSource(self))
        try:
            yield from gen
        except (CorruptEntry, FingerprintMismatch, KeyError) as e:  # KeyError: deleted meanwhile
            log.warning("streamed chunk KV unusable (%s); reading chunk by chunk", e)
            gen = run(self.kv_source)
            yield from gen
        return gen.result


class _StreamedSource:
    """The service's KV source with `stream` (see engine.KVSource), handed to the engine on CUDA."""

    def __init__(self, service: RagService):
        self._service = service

    def __call__(self, key: str, ids: list[int]) -> ChunkKV:
        return self._service.kv_source(key, ids)

    def stream(self, keys: list[str], ids_list: list[list[int]], layers: list[int]) -> list[ChunkKV] | ArrivingKV:
        return self._service.kv_stream(keys, ids_list, layers)
