"""One thread owns the model. Queries wait in a bounded queue in front of it; a full queue is
refused at once (503 + Retry-After) rather than letting latency grow without bound.

The worker talks to the request that submitted a job through that job's event channel, an
asyncio queue fed with `call_soon_threadsafe`: `Started` once the prompt is prefilled, then the
text pieces, then `Finished` or `Failed`. The request sets `cancelled` when its client goes
away; the worker checks it before starting and between tokens, and drops the generation.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

from api.errors import ApiError
from api.metrics import Metrics
from api.service import RagService
from blend.engine import Answer
from blend.spec import BadQuery, ContextOverflow, QuerySpec
from retrieval.corpus import Hit

log = logging.getLogger(__name__)

EMPTY_INDEX = "the index is empty: add documents with POST /v1/documents (or `ragblend index`) first"


@dataclass(frozen=True)
class QueryParams:
    """A query as the worker serves it: what to retrieve, and the engine's QuerySpec."""
    question: str
    top_k: int
    spec: QuerySpec


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
    """One query: its parameters, its event channel (worker → request) and its cancel flag."""

    def __init__(self, params: QueryParams, loop: asyncio.AbstractEventLoop):
        self.params = params
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
    def __init__(self, service: RagService, max_queue: int, metrics: Metrics):
        self.service, self.metrics = service, metrics
        self.max_queue = max_queue
        self._jobs: queue.Queue[QueryJob] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._current: QueryJob | None = None
        self._job_seconds = 1.0  # moving average of a job's model time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="ragblend-model", daemon=True)

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._current is not None:
            self._current.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            job.emit(Failed(ApiError(503, "the server is shutting down")))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def depth(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def retry_after(self) -> int:
        """What the jobs ahead will likely take: a moving average of one job's time × the queue."""
        return max(1, min(60, math.ceil(self._job_seconds * (self.depth + 1))))

    def submit(self, job: QueryJob) -> None:
        if self._stop.is_set():
            raise QueueFull(5)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.labels("query").inc()
            raise QueueFull(self.retry_after()) from None

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.25)
            except queue.Empty:
                continue
            if job.cancelled.is_set():  # its client left while it waited
                self.metrics.cancelled.inc()
                continue
            self._current = job
            t0 = time.perf_counter()
            try:
                self._serve(job)
            except ApiError as e:
                job.emit(Failed(e))
            except ContextOverflow as e:
                job.emit(Failed(ApiError(400, f"{e}: lower top_k, max_tokens or the question's length")))
            except BadQuery as e:  # the engine's word on a setting it cannot take (it names the field)
                job.emit(Failed(ApiError(422, str(e))))
            except Exception:  # a bug of ours, never the client's: logged with its traceback
                log.exception("query failed")
                job.emit(Failed(ApiError(500, "internal error while answering (logged on the server)")))
            finally:
                self._current = None
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - t0)

    def _serve(self, job: QueryJob) -> None:
        p, svc = job.params, self.service
        queue_ms = (time.perf_counter() - job.enqueued_at) * 1e3
        self.metrics.queue_wait.observe(queue_ms / 1e3)
        retrieved = svc.retrieve(p.question, p.top_k)
        if not retrieved.hits:
            raise ApiError(409, EMPTY_INDEX)
        with svc.model_lock:
            gen = svc.answer(p.question, retrieved.hits, p.spec)
            pieces = iter(gen)
            # KV load and prefill run on the first step: an error there reaches the client as an
            # HTTP status, since nothing has been sent yet.
            piece = next(pieces, None)
            job.emit(Started(retrieved.hits, retrieved.retrieve_ms, queue_ms))
            sent = 0
            while piece is not None:
                if job.cancelled.is_set():
                    pieces.close()
                    self.metrics.cancelled.inc()
                    self.metrics.tokens.inc(sent)
                    return
                if piece:
                    job.emit(piece)
                sent += 1
                piece = next(pieces, None)
        answer = gen.result
        assert answer is not None
        self.metrics.ttft.labels(p.spec.mode.value).observe(answer.ttft_ms / 1e3)
        self.metrics.tokens.inc(len(answer.token_ids))
        self.metrics.prompt_tokens.labels("reused").inc(answer.cached_tokens)
        self.metrics.prompt_tokens.labels("computed").inc(answer.total_tokens - answer.cached_tokens)
        if answer.guard_raised:
            self.metrics.guard_raised.inc()
        job.emit(Finished(answer))
