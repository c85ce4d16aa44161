"""The API's side of the scheduler (blend/scheduler.py): one thread owns the model and decodes
every running query in one batch; queries wait, bounded, in front of it, and a full queue is
refused at once (503 + Retry-After) rather than letting latency grow without bound.

The scheduler talks to the request that submitted a job through that job's event channel, an
asyncio queue fed with `call_soon_threadsafe`: `Started` once the prompt is prefilled, then the
text pieces, then `Finished` or `Failed`. The request sets `cancelled` when its client goes
away; the scheduler checks it before admitting the job and before every decode step, and frees
the sequence's KV slot at once.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from api.errors import ApiError
from api.metrics import Metrics
from api.service import RagService, Retrieved
from blend.batch import KVSlots
from blend.engine import Answer
from blend.prompt import Layout
from blend.memory import CPU_KV_BYTES
from blend.scheduler import Cancelled, Job, SchedulerConfig, SchedulerFull
from blend.spec import BadQuery, ContextOverflow, QuerySpec
from retrieval.corpus import Hit
from retrieval.search import SearchOptions

log = logging.getLogger(__name__)

EMPTY_INDEX = "the index is empty: add documents with POST /v1/documents (or `ragblend index`) first"


@dataclass(frozen=True)
class QueryParams:
    """A query as the worker serves it: what to retrieve, and the engine's QuerySpec."""
    question: str
    top_k: int
    spec: QuerySpec
    search: SearchOptions = field(default_factory=SearchOptions)


@dataclass
class Started:
    hits: list[Hit]
    retrieve_ms: float
    queue_ms: float


@dataclass
class Finished:
    answer: Answer


@dataclass
class Failed:
    error: ApiError


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class QueryJob:
    """One query: its parameters, what was retrieved for it and its prompt, its event channel
    (scheduler → request) and its cancel flag."""

    def __init__(self, params: QueryParams, loop: asyncio.AbstractEventLoop, retrieved: Retrieved,
                 layout: Layout):
        self.params, self.retrieved, self.layout = params, retrieved, layout
        self.started: Started | None = None  # once the prompt is prefilled (api.answering.wait_started)
        self.cancelled = threading.Event()
        self.enqueued_at = time.perf_counter()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def emit(self, event: object) -> None:
        """Worker side; thread-safe."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody will read this job any more
            self.cancelled.set()

    async def next_event(self, timeout: float | None = None) -> object:
        """Request side; raises TimeoutError after `timeout` seconds without an event."""
        return await asyncio.wait_for(self._events.get(), timeout)

    def cancel(self) -> None:
        self.cancelled.set()


class ModelWorker:
    def __init__(self, service: RagService, max_queue: int, metrics: Metrics,
                 config: SchedulerConfig | None = None):
        self.service, self.metrics = service, metrics
        self.max_queue = max_queue
        engine = service.engine
        if config is None:
            config = SchedulerConfig.for_memory(engine, CPU_KV_BYTES, max_waiting=max_queue)
        self.scheduler = engine.scheduler  # the engine's one loop: this worker runs it on its thread
        self.scheduler.configure(config)
        self.scheduler.on_step = self._on_step

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        """The loop on its thread, after capturing the decode graphs (`warming` until then)."""
        self.scheduler.start(warm=True)

    @property
    def warming(self) -> bool:
        return self.scheduler.warming

    def stop(self, timeout: float = 10.0) -> None:
        for job in self.scheduler.stop(timeout):
            job.on_error(ApiError(503, "the server is shutting down"))
        self.scheduler.on_step = None

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    @property
    def depth(self) -> int:
        return self.scheduler.waiting

    @property
    def busy(self) -> bool:
        return self.scheduler.running > 0

    def retry_after(self) -> int:
        return self.scheduler.retry_after()

    def snapshot(self) -> dict:
        s = self.scheduler
        return {"running": s.running, "waiting": s.waiting, "kv_tokens_used": s.kv_tokens_used,
                "kv_bytes_used": s.kv_tokens_used * KVSlots.bytes_per_token(s.engine.parts),
                "kv_bytes_total": s.kv_bytes, "max_batch": s.config.max_batch}

    def submit(self, job: QueryJob) -> None:
        """Queue a job whose chunks are retrieved (`job.retrieved`) and laid out (`job.layout`).
        Raises ApiError for what the request must change, QueueFull when the queue is full."""
        p = job.params
        sched_job = Job(job.layout, p.spec, self.service.source, cancelled=job.cancelled, enqueued_at=job.enqueued_at,
                        on_start=lambda seq: self._started(job, seq), on_piece=job.emit,
                        on_done=lambda answer: self._finished(job, answer),
                        on_error=lambda e: self._failed(job, e))
        try:
            self.scheduler.submit(sched_job)
        except ContextOverflow as e:
            raise ApiError(400, f"{e}: lower top_k, max_tokens or the question's length") from None
        except BadQuery as e:  # the engine's word on a setting it cannot take (it names the field)
            raise ApiError(422, str(e)) from None
        except SchedulerFull as e:
            self.metrics.rejected.labels("query").inc()
            raise QueueFull(e.retry_after) from None

    # -- callbacks, on the model thread --------------------------------------------------------
    def _on_step(self, batch: int, seconds: float) -> None:
        self.metrics.batch_size.observe(batch)
        self.metrics.step_time.observe(seconds)

    def _started(self, job: QueryJob, seq) -> None:
        # Waiting ends when the scheduler takes the job (`seq.t0`, before its KV load and prefill,
        # which the answer's own timings count), not when the prefill is done.
        queue_ms = (seq.t0 - job.enqueued_at) * 1e3
        self.metrics.queue_wait.observe(queue_ms / 1e3)
        job.emit(Started(job.retrieved.hits, job.retrieved.retrieve_ms, queue_ms))

    def _finished(self, job: QueryJob, answer: Answer) -> None:
        m = self.metrics
        m.tokens.inc(len(answer.token_ids))
        if answer.finish_reason == "cancelled":
            m.cancelled.inc()
            return
        m.ttft.labels(answer.mode).observe(answer.ttft_ms / 1e3)
        if len(answer.token_ids) > 1:
            m.tpot.observe(answer.per_token_ms / 1e3)
        m.prompt_tokens.labels("reused").inc(answer.cached_tokens)
        m.prompt_tokens.labels("computed").inc(answer.total_tokens - answer.cached_tokens)
        if answer.ratio is not None:
            m.ratio.observe(answer.ratio)
        job.emit(Finished(answer))

    def _failed(self, job: QueryJob, error: BaseException) -> None:
        if isinstance(error, Cancelled):
            self.metrics.cancelled.inc()
        elif isinstance(error, ApiError):
            job.emit(Failed(error))
        elif isinstance(error, ContextOverflow):
            job.emit(Failed(ApiError(400, f"{error}: lower top_k, max_tokens or the question's length")))
        elif isinstance(error, BadQuery):
            job.emit(Failed(ApiError(422, str(error))))
        else:  # a bug of ours, never the client's: logged with its traceback
            log.error("query failed", exc_info=error)
            job.emit(Failed(ApiError(500, "internal error while answering (logged on the server)")))

