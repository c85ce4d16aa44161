"""Indexing jobs on a background thread of their own, so that a POST returns at once (202) and
queries keep being answered: the service's write_lock serializes writers, and the model is
taken only chunk by chunk while KV is computed, so a query waits at most one chunk's prefill.

Each document commits atomically (a query sees all of its chunks or none); a job of several
documents (a JSONL upload) commits them one by one. Where the data dir records `--neighbours N`
(N ≥ 1), a job whose documents are all committed then gives their chunks neighbour-aware entries
(RagService.index_neighbours) and succeeds only once those are recorded and served; a job that
fails or is interrupted records none (its chunks are served plain, and the next job that
succeeds, or `ragblend index`, gives them theirs). Job records are kept in the registry as
well (status, report so far), without the texts: a job that a stop or a crash cut short is
`interrupted` after the restart, its report counting the documents it had committed, and its
client resubmits it.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from api.metrics import Metrics
from api.service import IndexReport, RagService
from api.worker import QueueFull
from retrieval import Document

log = logging.getLogger(__name__)
KEEP_FINISHED = 1000  # finished job records kept for polling; older ones are forgotten
INTERRUPTED = ("the server stopped before this job finished; the documents its report counts were "
               "committed, submit the others again")
NEIGHBOURS_FAILED = ("; the documents were committed and are served with their plain chunk KV, but their "
                     "neighbour-aware entries (--neighbours) were not recorded: submit the job again to compute them")


@dataclass
class IndexJob:
    job_id: str
    doc_ids: list[str]
    documents: list[Document] = field(repr=False)
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    report: dict | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {"job_id": self.job_id, "status": self.status, "doc_ids": self.doc_ids,
                "created_at": self.created_at, "started_at": self.started_at,
                "finished_at": self.finished_at, "report": self.report, "error": self.error}


class Indexer:
    def __init__(self, service: RagService, max_pending: int, metrics: Metrics):
        self.service, self.metrics = service, metrics
        self._pending: queue.Queue[IndexJob] = queue.Queue(maxsize=max_pending)
        self._jobs: OrderedDict[str, IndexJob] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ragblend-indexer", daemon=True)
        self._registry = service.corpus.registry
        if cut := self._registry.interrupt_jobs(INTERRUPTED):  # left queued or running by the last run
            log.warning("%d indexing jobs of the previous run were cut short; marked interrupted", cut)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the document in flight (its commit is atomic either way), drop the rest."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            for job in self._jobs.values():
                if job.status in ("queued", "running"):
                    job.status, job.error, job.finished_at = "interrupted", INTERRUPTED, time.time()
                    self.metrics.index_jobs.labels(job.status).inc()
            self._registry.interrupt_jobs(INTERRUPTED)

    def submit(self, docs: list[Document]) -> IndexJob:
        job = IndexJob(uuid.uuid4().hex, [d.id for d in docs], docs)
        if self._stop.is_set():
            raise QueueFull(5)
        with self._lock:
            try:
                self._pending.put_nowait(job)
            except queue.Full:
                self.metrics.rejected.labels("index").inc()
                raise QueueFull(30) from None
            self._jobs[job.job_id] = job
            self._registry.put_job(job.as_dict())
            self._forget_old()
        return job

    def get(self, job_id: str) -> dict | None:
        """The job's record: from memory, or from the registry (a job of an earlier run)."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job.as_dict() if job is not None else self._registry.get_job(job_id)

    def _save(self, job: IndexJob) -> None:
        with self._lock:
            self._registry.put_job(job.as_dict())

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(j.status in ("queued", "running") for j in self._jobs.values())

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.status in ("succeeded", "failed", "interrupted")]
        for k in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[k]
        if len(finished) > KEEP_FINISHED:
            self._registry.forget_jobs(KEEP_FINISHED)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._pending.get(timeout=0.25)
            except queue.Empty:
                continue
            with self._lock:
                if job.status != "queued":  # interrupted by stop() meanwhile
                    continue
                job.status, job.started_at = "running", time.time()
            self._save(job)
            report = IndexReport()
            t0 = time.perf_counter()
            committed = False
            try:
                for i, doc in enumerate(job.documents):
                    if self._stop.is_set():
                        job.status, job.error = "interrupted", INTERRUPTED
                        break
                    self.service.index_document(doc, report)
                    if i + 1 < len(job.documents):  # how far it got, should the process die now
                        report.seconds = time.perf_counter() - t0
                        job.report = report.as_dict()
                        self._save(job)
                else:
                    committed = True
                    self.service.index_neighbours(report)  # --neighbours N recorded: the entries too
                    job.status = "succeeded"
            except Exception as e:
                log.exception("indexing job %s failed", job.job_id)
                job.status, job.error = "failed", f"{type(e).__name__}: {e}"
                if committed:
                    job.error += NEIGHBOURS_FAILED
            finally:
                report.seconds = time.perf_counter() - t0
                job.report, job.finished_at = report.as_dict(), time.time()
                job.documents = []  # the texts are in the index now; do not keep them twice
                self._save(job)
                self.metrics.index_jobs.labels(job.status).inc()
