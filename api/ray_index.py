"""`ragblend index --ray ADDRESS`: the chunk-KV precompute of an index run spread over a Ray cluster.

Precomputing chunk KV (a full prefill of every chunk) is the expensive part of indexing; this
module moves it, with chunking and embedding, onto a pool of Ray actors (one per GPU, or per CPU
slot), each of which loads the model once. The driver (the `ragblend index` process) keeps what
must have one writer — the registry and the FAISS index — and commits each document as today, in
one transaction, in the order the documents were given, so a run gives the registry a local run
gives, and a rerun after any failure resumes (committed documents are unchanged, stored KV is
reused).

Where the KV goes:
- with `--kv-store redis://…` (a shared tier every node reaches), each worker writes its chunks'
  entries straight to it (SET NX of the checked byte format, store/serialize.py) and returns
  only chunk ids, keys, token counts and embeddings;
- without it, the KV lives in the data dir's LMDB, which has one writer (the driver's process):
  workers return each computed entry encoded in the same checked format, and the driver writes it
  before committing the document. That is sound on any cluster (nothing but the driver opens the
  LMDB, whichever node a worker runs on); it costs the driver's link the KV bytes, which is why a
  multi-node run should name a shared tier.
Nothing is unpickled from outside: Ray's transport carries objects between this run's own
processes, and KV bytes cross it only as the store's checked entries, whose header (format, model
fingerprint, key) the driver verifies before writing, and whose layer CRCs every read checks.

A worker that dies (its node lost, killed, out of memory) loses only the documents it had in
flight: the driver starts a replacement and sends them again (up to `attempts` times each). A
document that fails inside a worker (the shared tier unreachable, for one) stops the run: what
finished before it is committed, and the error says how to resume.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval import Chunk, Document, chunk_text

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ragblend[ray]'"
IN_FLIGHT_PER_WORKER = 2  # one computing, one queued behind it: a worker never waits for the driver
AHEAD_PER_WORKER = 8      # documents finished but not yet committable (an earlier one is slow) stay bounded


class RayMissing(RuntimeError):
    """Ray is not installed."""


class IndexRunFailed(RuntimeError):
    """A document failed in a worker; the documents before it are committed. `cause` is its error."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str, workers: int | None = None) -> None:
    """Join the cluster at `address` (`auto`: the one RAY_ADDRESS or `ray start` on this machine
    names; `local`: start one here for this run, with a CPU slot for each of `workers` even past
    the machine's cores; else host:port or ray://host:port). Already connected (a test, a
    notebook): that cluster is used."""
    ray = import_ray()
    if ray.is_initialized():
        return
    local = address == "local"
    extra: dict[str, Any] = {}
    if local:  # this checkout's code, as the driver imports it, in the workers too
        extra["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}
        extra["num_cpus"] = max(os.cpu_count() or 1, workers or 0)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **extra)
    except ConnectionError as e:
        raise ValueError(f"--ray {address}: no Ray cluster there ({e}); start one with `ray start --head`, "
                         "or pass --ray local to start one on this machine for this run") from None


# -- the worker ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What every worker loads once. `embedder`: a sentence-transformers reference (str) or None
    for the bundled one, or an embedder object itself (tests hand in the hash embedder)."""
    model: str
    device: str
    dtype: str
    chunk_tokens: int
    fingerprint: str  # the driver's: a worker whose model differs refuses to start
    threads: int = 1
    embedder: Any = None


@dataclass
class DocResult:
    """One document as a worker hands it back: what the driver commits."""
    doc_id: str
    chunks: list[Chunk]
    keys: list[str]
    tokens: int
    computed: int
    embeddings: np.ndarray
    # without a shared tier: (key, checked entry bytes, metadata) of each chunk KV computed
    entries: list[tuple[str, bytes, dict]] = field(default_factory=list)


def embedder_recipe(embedder: Any) -> Any:
    """What a worker rebuilds the driver's embedder from: a sentence-transformers model is loaded
    again from its reference (the object holds a lock and a model); any other is sent as it is."""
    from retrieval.embed import Embedder

    if isinstance(embedder, Embedder):
        return ("sentence-transformers", embedder._model_ref, embedder.device)
    return embedder


class ChunkWorker:
    """One Ray actor: the model, the embedder and (per URL) a connection to the shared tier,
    loaded once; `index(doc)` chunks, computes and stores the chunk KV, and embeds."""

    def __init__(self, spec: WorkerSpec):
        from api.cli_common import set_threads
        from blend.engine import Engine
        from blend.loader import load_model

        set_threads(spec.threads)
        self.spec = spec
        self.engine = Engine(load_model(spec.model, device=spec.device, dtype=spec.dtype))
        if self.engine.fingerprint != spec.fingerprint:
            raise ValueError(f"the worker's model {spec.model!r} is not the driver's (fingerprint "
                             f"{self.engine.fingerprint} vs {spec.fingerprint}): every node must have the same weights")
        recipe = spec.embedder
        if isinstance(recipe, tuple) and recipe and recipe[0] == "sentence-transformers":
            from retrieval.embed import Embedder

            recipe = Embedder(recipe[1], device=recipe[2])
        self.embedder = recipe
        self._run: tuple | None = None  # the run the cache below is for
        self._kv = None

    def ready(self) -> int:
        """The worker's process id, once the model is loaded."""
        return os.getpid()

    def _cache(self, run: str, store_url: str | None, kv_format: str):
        """The chunk-KV cache this worker computes through: over the shared tier (which it writes),
        or over no store (the entries go back to the driver). A new one for each run: a rerun
        after the tier failed must not meet the last run's open circuit breaker."""
        if self._run != (run, store_url, kv_format):
            if self._kv is not None:
                self._kv.close()  # its reader and its writer thread
                if self._kv.store is not None:
                    self._kv.store.close()
            store = None
            if store_url:
                from store.redis_store import RedisKVStore, split_url

                clean, _, prefix, _ = split_url(store_url)
                store = RedisKVStore(clean, prefix=prefix, fmt=kv_format)
            self._kv = self.engine.kv_cache(store=store, gpu_bytes=0, stream=False, kv_format=kv_format)
            self._run = (run, store_url, kv_format)
        return self._kv

    def index(self, run: str, doc: Document, store_url: str | None, kv_format: str,
              present: Sequence[str] = ()) -> DocResult:
        """`present`: keys the driver's store already holds (no shared tier): not computed again."""
        from store.serialize import encode_kv

        cache = self._cache(run, store_url, kv_format)
        chunks = chunk_text(doc.id, doc.text, self.engine.tokenizer, self.spec.chunk_tokens)
        keys, entries, computed, tokens = [], [], 0, 0
        skip = set(present)
        with cache.pipelined_writes():  # on the shared tier before the driver commits (store/writes.py)
            for chunk in chunks:
                ids = self.engine.prompts.chunk_ids(chunk.text)
                meta = {"doc_id": doc.id, "chunk_index": chunk.index, "start": chunk.start, "end": chunk.end,
                        "text": chunk.text}
                if store_url:
                    key, made = cache.ensure(ids, meta)  # SET NX on the shared tier
                else:
                    key, made = cache.key(ids), False
                    if key not in skip:
                        kv = cache.compute(ids)
                        entries.append((key, encode_kv(kv, cache.shape.fingerprint, kv_format, key),
                                        cache.entry_meta(ids, meta)))
                        skip.add(key)
                        made = True
                keys.append(key)
                computed += made
                tokens += len(ids)
        embeddings = self.embedder.encode([c.text for c in chunks])
        return DocResult(doc.id, chunks, keys, tokens, computed, embeddings, entries)


# -- the driver ------------------------------------------------------------------------------------
class WorkerPool:
    """`n` ChunkWorker actors, each holding one GPU (device cuda) or one CPU slot."""

    def __init__(self, spec: WorkerSpec, n: int):
        import time

        ray = import_ray()
        t0 = time.perf_counter()
        self.spec, self.n = spec, n
        gpu = spec.device.startswith("cuda")
        self._actor = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1 if gpu else spec.threads)(ChunkWorker)
        self.actors = [self._start() for _ in range(n)]
        try:
            self.pids = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            self.close()
            raise ValueError(f"a Ray worker could not start: {e}") from None
        self.startup_s = time.perf_counter() - t0  # until every worker had its model loaded
        self.restarts = 0
        self.starting: dict[int, Any] = {}  # slot → its replacement's ready() call, while it loads the model

    def ready_slots(self) -> list[int]:
        """The slots whose worker has its model loaded (a replacement's pid is filled in here)."""
        ray = import_ray()
        if self.starting:
            done, _ = ray.wait(list(self.starting.values()), num_returns=len(self.starting), timeout=0)
            for slot, ref in list(self.starting.items()):
                if ref in done:
                    del self.starting[slot]
                    try:
                        self.pids[slot] = ray.get(ref)
                    except ray.exceptions.RayActorError:  # died while loading: start another
                        self.replace(slot)
        return [i for i in range(len(self.actors)) if i not in self.starting]

    def _start(self):
        return self._actor.remote(self.spec)

    def replace(self, i: int) -> None:
        """A fresh worker in slot i (the old one died). Workers that keep dying (each replacement
        too, say out of memory while loading the model) end the run."""
        ray = import_ray()
        if self.restarts >= 3 * self.n:
            raise IndexRunFailed(f"{self.restarts} Ray workers died in this run; giving up (see the Ray logs)")
        try:
            ray.kill(self.actors[i])
        except Exception:  # already gone
            pass
        self.actors[i] = self._start()
        self.pids[i] = None
        self.starting[i] = self.actors[i].ready.remote()
        self.restarts += 1

    def close(self) -> None:
        ray = import_ray()
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []


def default_workers(device: str) -> int:
    """One worker per GPU of the cluster (device cuda), else one per CPU."""
    ray = import_ray()
    res = ray.cluster_resources()
    n = int(res.get("GPU", 0) if device.startswith("cuda") else res.get("CPU", 1))
    if n < 1:
        raise ValueError("--device cuda with --ray: the cluster has no GPU (or give --ray-workers)")
    return n


def index_on_ray(service, docs: list[Document], pool: WorkerPool, *, store_url: str | None,
                 progress: Callable[[int, int], None] | None = None, report=None, attempts: int = 3):
    """Index `docs` through `pool` into `service` (its registry, FAISS index and, without
    `store_url`, its LMDB); see the module docstring. Fills and returns `report` (IndexReport).
    Raises IndexRunFailed when a document fails in a worker, after committing the ones before it."""
    import time

    from api.service import IndexReport

    ray = import_ray()
    report = report if report is not None else IndexReport()
    kv, store = service.kv, service.store
    fmt = kv.format.name
    run = uuid.uuid4().hex
    t0 = time.perf_counter()
    todo: deque[tuple[int, int]] = deque()  # (document's place in the run, attempts so far)
    ready: dict[int, DocResult | None] = {}  # None: unchanged, nothing to commit but the count
    for seq, doc in enumerate(docs):
        if service.corpus.document_unchanged(doc, service.params):
            ready[seq] = None
        else:
            todo.append((seq, 0))
    flight: dict[Any, tuple[int, int, int]] = {}  # ref → (worker slot, seq, attempts)
    next_commit = 0
    failure: IndexRunFailed | None = None

    def present(doc: Document) -> list[str]:
        if store_url:
            return []
        return [k for k in (kv.key(service.engine.prompts.chunk_ids(c.text))
                            for c in chunk_text(doc.id, doc.text, service.engine.tokenizer, service.chunk_tokens))
                if store.contains(k)]

    def dispatch() -> None:
        """Documents to the least loaded worker that has its model (a replacement that is still
        loading gets none: the others take the documents its predecessor lost)."""
        slots = pool.ready_slots()
        load = [0] * len(pool.actors)
        for slot, _, _ in flight.values():
            load[slot] += 1
        while todo and failure is None and slots:
            slot = min(slots, key=load.__getitem__)
            seq, tries = todo[0]
            if load[slot] >= IN_FLIGHT_PER_WORKER or seq >= next_commit + AHEAD_PER_WORKER * len(pool.actors):
                return
            todo.popleft()
            doc = docs[seq]
            ref = pool.actors[slot].index.remote(run, doc, store_url, fmt, present(doc))
            flight[ref] = (slot, seq, tries + 1)
            load[slot] += 1

    def commit_ready() -> None:
        nonlocal next_commit
        while next_commit in ready:
            got, doc = ready.pop(next_commit), docs[next_commit]
            report.documents += 1
            with service.write_lock:
                if got is None:
                    report.unchanged += 1
                    report.committed += 1
                else:
                    for key, value, meta in got.entries:
                        _write_entry(store, kv, key, value, meta)
                    service.commit_document(doc, got.chunks, got.keys, got.embeddings, report)
                    report.chunks += len(got.chunks)
                    report.tokens += got.tokens
                    report.kv_computed += got.computed
            next_commit += 1

    try:
        commit_ready()
        dispatch()
        while flight or (todo and failure is None):
            waiting = list(flight) + list(pool.starting.values())  # a result, or a replacement ready
            if not waiting:
                raise IndexRunFailed("no Ray worker is left to send documents to")
            done, _ = ray.wait(waiting, num_returns=1)
            ref = done[0]
            if ref not in flight:
                dispatch()
                continue
            slot, seq, tries = flight.pop(ref)
            try:
                got: DocResult = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the worker died: its documents in flight go again
                lost = [(seq, tries)]
                for r in [r for r, (sl, _, _) in flight.items() if sl == slot]:
                    lost.append(flight.pop(r)[1:])
                log.warning("Ray worker %d died (%s); retrying its %d documents on a new worker", slot, e, len(lost))
                for s, t in sorted(lost, reverse=True):  # back at the head of the queue, in order
                    if t >= attempts and failure is None:
                        failure = IndexRunFailed(f"document {docs[s].id!r} was lost with its worker {t} times; the "
                                                 "last error: " + str(e).splitlines()[0], e)
                    todo.appendleft((s, t))
                pool.replace(slot)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                failure = failure or IndexRunFailed(f"document {docs[seq].id!r}: {type(cause).__name__}: {cause}",
                                                    cause)
            else:
                if progress is not None:
                    progress(len(got.chunks), got.tokens)
                ready[seq] = got
                commit_ready()
            dispatch()
    finally:
        report.seconds = time.perf_counter() - t0
    if failure is not None:
        raise failure
    return report


def _write_entry(store, kv, key: str, value: bytes, meta: dict) -> None:
    """A worker's entry into the driver's LMDB, once its header is checked: this model's, bound to
    this key, in the cache's format (the layer CRCs are checked on every read)."""
    from store.serialize import open_entry

    _, head = open_entry(value, kv.shape.fingerprint, key)
    if head.fmt.name != kv.format.name or not kv.shape.fits(head.shape, meta["n_tokens"]):
        raise ValueError(f"a worker returned chunk {key[:12]} as {head.fmt.name} {head.shape}, "
                         f"not {kv.format.name} for this model")
    store.put_encoded(key, value, meta, if_absent=True)
