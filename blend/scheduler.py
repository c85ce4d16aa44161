"""Continuous batching: one thread owns the model and, each iteration, admits waiting requests
(their KV fetched and their prompt prefilled, in any mode), then runs one batched decode step for
every running sequence. A sequence leaves at a stop token, at max_tokens or when its client goes
away, and its KV slot is free for the next admission at once.

Admission is bounded three ways: free KV slots (decode memory is preallocated, so it never runs
out), `max_batch` sequences decoding together, and a prompt-token budget per iteration so that a
burst of arrivals does not stall the running sequences for more than about one long prefill.
Past `max_waiting` queued requests, `submit` refuses (the server answers 503 + Retry-After).

Callbacks run on the model thread; they must only hand data over (e.g. to an event loop).
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blend.batch import DecodeBatch, KVSlots
from blend.engine import Engine
from blend.prompt import Layout
from blend.sequence import Answer, SeqState
from blend.spec import ContextOverflow, QuerySpec
from store.tiers import ChunkKVSource

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job's client left before its prompt was prefilled."""


class SchedulerFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many requests waiting; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request as the scheduler serves it, and how it reports back."""
    layout: Layout
    spec: QuerySpec
    kv: ChunkKVSource
    on_start: Callable[[SeqState], None] = lambda seq: None       # prefilled (first token next)
    on_piece: Callable[[str], None] = lambda piece: None          # new text
    on_done: Callable[[Answer], None] = lambda answer: None       # the end (finish_reason says how)
    on_error: Callable[[BaseException], None] = lambda error: None  # failed (before or while decoding)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 32              # sequences decoding together (1: one request at a time)
    slots: int = 32                  # KV slots (≥ max_batch to use it)
    slot_tokens: int = 4096          # prompt + answer tokens per slot
    max_waiting: int = 32            # queued requests past which submit refuses
    prefill_tokens: int = 8192       # prompt tokens admitted per iteration (at least one request)

    def __post_init__(self) -> None:
        for name in ("max_batch", "slots", "slot_tokens", "max_waiting", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    @classmethod
    def for_memory(cls, engine: Engine, kv_bytes: int, **kw) -> "SchedulerConfig":
        """As many slots as `kv_bytes` of decode KV memory holds (at least one)."""
        slot_tokens = min(kw.pop("slot_tokens", 4096), engine.max_context)
        per_slot = KVSlots.bytes_per_token(engine.parts) * slot_tokens
        slots = max(1, kv_bytes // per_slot)
        return cls(slots=slots, slot_tokens=slot_tokens, max_batch=min(kw.pop("max_batch", 32), slots), **kw)


class Scheduler:
    def __init__(self, engine: Engine, config: SchedulerConfig = SchedulerConfig(),
                 model_lock: threading.Lock | None = None,
                 on_step: Callable[[int, float], None] | None = None):
        self.engine, self.config = engine, config
        self.slots = KVSlots(engine.parts, config.slots, min(config.slot_tokens, engine.max_context))
        self.batch = DecodeBatch(engine.parts, self.slots)
        self.model_lock = model_lock or threading.Lock()
        self.on_step = on_step
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: dict[int, tuple[Job, SeqState]] = {}
        self._stop = threading.Event()
        self._step_s = 0.05   # moving averages, for Retry-After
        self._job_s = 1.0
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="ragblend-scheduler", daemon=True)

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> list[Job]:
        """Stop the loop; running sequences end as cancelled. Returns the jobs never started."""
        self._stop.set()
        with self._cond:
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        return left

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def kv_tokens_used(self) -> int:
        return self.slots.used_tokens

    @property
    def kv_bytes(self) -> int:
        return self.slots.kv.numel() * self.slots.kv.element_size()

    def retry_after(self) -> int:
        ahead = self.waiting + 1
        rounds = math.ceil(ahead / max(1, self.config.max_batch))
        return max(1, min(60, math.ceil(rounds * self._job_s)))

    def submit(self, job: Job) -> None:
        """Queue a job; raises BadQuery for what the request must change, SchedulerFull when the
        queue is at its bound."""
        self.engine.check(job.layout, job.spec)
        need = job.layout.n_tokens + job.spec.max_tokens
        if need >= self.slots.max_tokens:
            raise ContextOverflow("max_tokens", f"the prompt ({job.layout.n_tokens} tokens) plus max_tokens="
                                  f"{job.spec.max_tokens} exceeds this server's {self.slots.max_tokens - 1} "
                                  "tokens per sequence")
        with self._cond:
            if self._stop.is_set() or len(self._waiting) >= self.config.max_waiting:
                raise SchedulerFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()

    def generate(self, layout: Layout, spec: QuerySpec, kv: ChunkKVSource, timeout: float | None = None) -> Answer:
        """The Python API: submit and wait for the answer (from any thread but the scheduler's)."""
        done = threading.Event()
        box: dict[str, object] = {}
        job = Job(layout, spec, kv, on_done=lambda a: (box.setdefault("answer", a), done.set()),
                  on_error=lambda e: (box.setdefault("error", e), done.set()))
        self.submit(job)
        if not done.wait(timeout):
            job.cancelled.set()
            raise TimeoutError("no answer in time")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["answer"]  # type: ignore[return-value]

    # -- the model thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                if not self._running and not self._waiting:
                    self._cond.wait(0.25)
                    continue
            try:
                with self.model_lock:
                    self._admit()
                    if self._running:
                        self._step()
            except Exception:  # a bug of ours in a step: every running sequence fails, the loop lives
                log.exception("decode step failed")
                for slot, (job, seq) in list(self._running.items()):
                    self.slots.release(slot)
                    self._running.pop(slot, None)
                    job.on_error(RuntimeError("the decode step failed (logged on the server)"))
        for slot, (job, seq) in list(self._running.items()):
            self._end(slot, job, seq, "cancelled")

    def _next_job(self, budget: int) -> Job | None:
        with self._cond:
            if not self._waiting or len(self._running) >= self.config.max_batch or not self.slots.free:
                return None
            if budget <= 0:
                return None
            return self._waiting.popleft()

    def _admit(self) -> None:
        budget = self.config.prefill_tokens
        while (job := self._next_job(budget)) is not None:
            budget -= job.layout.n_tokens
            if job.cancelled.is_set():  # its client left while it waited
                job.on_error(Cancelled())
                continue
            try:
                seq = self.engine.start(job.layout, job.spec, job.kv)
                job.on_start(seq)
                piece = seq.first()
            except Exception as e:  # the request's own failure (corrupt KV it could not repair, …)
                job.on_error(e)
                continue
            if piece:
                job.on_piece(piece)
            if seq.done:
                self._done(job, seq)
                continue
            seq.slot = self.slots.take(seq.result.kv)
            seq.result.kv = None  # the slot holds it now; the prefill's buffer may be reused
            self._running[seq.slot] = (job, seq)

    def _step(self) -> None:
        for slot, (job, seq) in list(self._running.items()):
            if job.cancelled.is_set():
                self._end(slot, job, seq, "cancelled")
        if not self._running:
            return
        t0 = time.perf_counter()
        rows = {slot: seq for slot, (_, seq) in self._running.items()}
        logits = self.batch.step({slot: seq.tokens[-1] for slot, seq in rows.items()})
        nxt = self._next_tokens(logits, rows)  # the step's one host sync
        dt = time.perf_counter() - t0
        self.steps += 1
        self._step_s = 0.9 * self._step_s + 0.1 * dt
        if self.on_step is not None:
            self.on_step(len(rows), dt)
        for slot, seq in rows.items():
            if slot not in nxt:
                continue  # it failed picking its token and has left the batch
            job = self._running[slot][0]
            try:
                piece = seq.push(nxt[slot])
                if piece:
                    job.on_piece(piece)
            except Exception as e:
                self._fail(slot, job, e)
                continue
            if seq.done:
                self._end(slot, job, seq, None)

    def _next_tokens(self, logits, rows: dict[int, SeqState]) -> dict[int, int]:
        """Every row's next token; a row whose own sampling fails leaves the batch with its error
        and the others keep decoding (the batched pick is retried row by row only then)."""
        try:
            return self.engine.next_tokens(logits, rows)
        except Exception:
            nxt = {}
            for slot, seq in rows.items():
                try:
                    nxt[slot] = self.engine.next_tokens(logits, {slot: seq})[slot]
                except Exception as e:
                    self._fail(slot, self._running[slot][0], e)
            return nxt

    def _fail(self, slot: int, job: Job, error: Exception) -> None:
        """One sequence's own failure: it alone ends, with its error."""
        log.warning("sequence in slot %d failed alone: %r", slot, error)
        self.slots.release(slot)
        self._running.pop(slot, None)
        job.on_error(error)

    def _end(self, slot: int, job: Job, seq: SeqState, reason: str | None) -> None:
        if reason is not None:
            seq.finish(reason)
        self.slots.release(slot)
        self._running.pop(slot, None)
        self._done(job, seq)

    def _done(self, job: Job, seq: SeqState) -> None:
        self._job_s = 0.8 * self._job_s + 0.2 * (time.perf_counter() - job.enqueued_at)
        job.on_done(seq.answer())
