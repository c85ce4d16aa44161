"""The one loop that drives the model. `Scheduler.step()` is schedule → execute → update, as
vLLM's `EngineCore.step`: every running sequence decodes one token in one batched step (decodes
first), then prefill and side work run from the queue, in arrival order, up to a token budget
(`prefill_tokens`), so that a burst of arrivals or one long prompt stalls the running sequences
for one budget's worth of compute, not for a whole prefill (Sarathi-Serve's chunked prefill).

Everything that runs the model is work in this queue: a request's prefill (`Job`, spread over
steps when it exceeds the budget, blend/prefill_work.py) and side work (`run_model`: a chunk's KV
for indexing, a logprob pass), each with its cost in tokens. Nothing else takes the model.
Serving loops `step()` on its own thread (`start`); `ask`, eval and the benches step it inline
through `Engine.generate`, from whichever thread waits for an answer (one steps at a time).

Admission is bounded by decode memory: a job starts its prefill only while a KV slot is free for
it (running + prefilling ≤ the slots, and ≤ `max_batch`); slots are preallocated
(blend/batch.py), sized from free memory (blend/memory.py), so decoding never runs out. Past
`max_waiting` queued requests, `submit` refuses (the server answers 503 + Retry-After).

Callbacks run on the stepping thread; they must only hand data over (e.g. to an event loop).
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from blend.prefill_work import PrefillWork, Runner
from blend.prompt import Layout
from blend.sequence import Answer, SeqState
from blend.spec import ContextOverflow, QuerySpec
from blend.work import INLINE, Cancelled, Job, SchedulerConfig, SchedulerFull, SideWork, T, slot_size
from store.tiers import ChunkKVSource

__all__ = ["INLINE", "Cancelled", "Job", "Scheduler", "SchedulerConfig", "SchedulerFull", "SideWork", "slot_size"]
log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine: Runner, config: SchedulerConfig = INLINE,
                 on_step: Callable[[int, float], None] | None = None):
        self.engine = engine
        self.config = config
        self.on_step = on_step
        self._waiting: collections.deque[Job | SideWork] = collections.deque()
        self._cond = threading.Condition()
        self._step_lock = threading.RLock()
        self._stepper: int | None = None  # the thread inside step(), if any
        self._running: dict[int, tuple[Job, SeqState]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.warming = False
        self._step_s = 0.05   # moving averages, for Retry-After
        self._job_s = 1.0
        self.steps = 0

    # -- control ---------------------------------------------------------------------------------
    def configure(self, config: SchedulerConfig) -> None:
        """New limits; the decode slots are allocated to them now (nothing may be running)."""
        with self._step_lock:
            if self._running:
                raise RuntimeError("cannot resize the decode slots while sequences are running")
            self.config = config
            self.engine.reserve_decode(config.slots, config.slot_tokens)
            self._stop.clear()  # a stopped scheduler serves again once configured

    def start(self, warm: bool = False) -> "Scheduler":
        """Loop `step()` on a thread of its own. `warm`: first capture the decode graphs of every
        batch bucket (`warming` is True until then)."""
        if self._thread is not None:
            raise RuntimeError("the scheduler's loop is already running")
        self._stop.clear()
        decoder = self.engine.decoder
        self.warming = warm and decoder is not None and decoder.graphs
        self._thread = threading.Thread(target=self._loop, name="ragblend-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> list[Job]:
        """Stop the loop; running sequences end as cancelled. Returns the jobs never started."""
        self._stop.set()
        with self._cond:
            left = [j for j in self._waiting if isinstance(j, Job) and j.work is None]
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None  # from now on, callers step it inline again
        with self._step_lock:
            for item in self._queued():
                if isinstance(item, SideWork):
                    self._finish_side(item, error=RuntimeError("the scheduler stopped"))
                elif item.work is not None:
                    item.work.close()
                    item.on_error(Cancelled())
            with self._cond:
                self._waiting.clear()
            for slot, (job, seq) in list(self._running.items()):
                self._end(slot, job, seq, "cancelled")
        return left

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def slots(self):
        return self.engine.decoder.slots

    @property
    def waiting(self) -> int:
        return sum(isinstance(j, Job) for j in self._queued())

    def _queued(self) -> list[Job | SideWork]:
        """The queue as it is now (other threads append to it while this one reads)."""
        with self._cond:
            return list(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def kv_tokens_used(self) -> int:
        d = self.engine.decoder
        return d.slots.used_tokens if d is not None else 0

    @property
    def kv_bytes(self) -> int:
        d = self.engine.decoder
        return d.slots.kv.numel() * d.slots.kv.element_size() if d is not None else 0

    def retry_after(self) -> int:
        ahead = self.waiting + 1
        rounds = math.ceil(ahead / max(1, self.config.max_batch))
        return max(1, min(60, math.ceil(rounds * self._job_s)))

    # -- work in -----------------------------------------------------------------------------------
    def submit(self, job: Job, bounded: bool = True) -> None:
        """Queue a job; raises BadQuery for what the request must change, SchedulerFull when the
        queue is at its bound (`bounded`: the server's callers; inline callers wait their turn)."""
        self.engine.check(job.layout, job.spec)
        need = job.layout.n_tokens + job.spec.max_tokens
        if self.config is not INLINE and need >= slot_size(self.config.slot_tokens):
            raise ContextOverflow("max_tokens", f"the prompt ({job.layout.n_tokens} tokens) plus max_tokens="
                                  f"{job.spec.max_tokens} exceeds this server's {slot_size(self.config.slot_tokens) - 1} "
                                  "tokens per sequence")
        with self._cond:
            queued = sum(isinstance(j, Job) for j in self._waiting)
            if bounded and (self._stop.is_set() or queued >= self.config.max_waiting):
                raise SchedulerFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify_all()

    def run_model(self, fn: Callable[[], T], cost: int) -> T:
        """Run `fn` (which uses the model) as side work in the queue's order, and return its
        result. On the stepping thread (a prefill's KV fetch recomputing a chunk) it runs at once."""
        if self._stepper == threading.get_ident():
            return fn()
        work: SideWork[T] = SideWork(fn, max(1, cost))
        with self._cond:
            self._waiting.append(work)
            self._cond.notify_all()
        self.drive(work.done.is_set)
        if work.error is not None:
            raise work.error
        return work.result  # type: ignore[return-value]

    def generate(self, layout: Layout, spec: QuerySpec, kv: ChunkKVSource, timeout: float | None = None) -> Answer:
        """The Python API: submit and wait for the answer."""
        gen = self.stream(layout, spec, kv, timeout)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    def stream(self, layout: Layout, spec: QuerySpec, kv: ChunkKVSource,
               timeout: float | None = None) -> Iterator[str]:
        """Text pieces as they are decoded; returns the Answer. Closing it early cancels the job
        (its slot is freed before close returns)."""
        pieces: collections.deque[str] = collections.deque()
        box: dict[str, object] = {}
        job = Job(layout, spec, kv, on_piece=pieces.append, on_done=lambda a: box.setdefault("answer", a),
                  on_error=lambda e: box.setdefault("error", e))
        self.submit(job, bounded=False)
        deadline = None if timeout is None else time.perf_counter() + timeout
        try:
            while True:
                self.drive(lambda: bool(pieces) or bool(box), deadline)
                while pieces:
                    yield pieces.popleft()
                if "error" in box:
                    raise box["error"]  # type: ignore[misc]
                if "answer" in box:
                    return box["answer"]  # type: ignore[return-value]
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError("no answer in time")
        finally:
            if not box:
                job.cancelled.set()
                self.drive(lambda: bool(box))

    def drive(self, done: Callable[[], bool], deadline: float | None = None) -> None:
        """Until `done()`: wait for the loop thread where one runs, else step inline."""
        looping = self.alive and threading.current_thread() is not self._thread
        while not done():
            if deadline is not None and time.perf_counter() > deadline:
                return
            if looping:
                with self._cond:
                    if not done():
                        self._cond.wait(0.05)
                looping = self.alive
            elif not self.step():
                with self._cond:  # another thread holds work that ends ours (or nothing to do)
                    if not done():
                        self._cond.wait(0.005)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.warming:
            t0 = time.perf_counter()
            try:
                n = self.engine.decoder.warm(self.config.max_batch)
                log.warning("captured %d decode graphs (batch ≤ %d, up to %d tokens) in %.1f s", n,
                            self.config.max_batch, self.slots.max_tokens, time.perf_counter() - t0)
            except Exception:
                log.exception("warming the decode graphs failed; they are captured on first use")
            self.warming = False
        while not self._stop.is_set():
            if not self.step():
                with self._cond:
                    if not self._waiting and not self._running and not self._stop.is_set():
                        self._cond.wait(0.25)

    def step(self) -> bool:
        """One iteration: decode every running sequence, then queued work up to the budget.
        Returns whether there was anything to do."""
        with self._step_lock:
            self._stepper = threading.get_ident()
            try:
                self._drop_cancelled()
                worked = bool(self._running)
                if self._running:
                    self._decode()
                worked = self._work(self.config.prefill_tokens) or worked
            finally:
                self._stepper = None
            if worked:
                self.steps += 1
        with self._cond:
            self._cond.notify_all()
        return worked

    def _drop_cancelled(self) -> None:
        for slot, (job, seq) in list(self._running.items()):
            if job.cancelled.is_set():
                self._end(slot, job, seq, "cancelled")
        with self._cond:
            gone = [j for j in self._waiting if isinstance(j, Job) and j.cancelled.is_set()]
            for job in gone:
                self._waiting.remove(job)
        for job in gone:  # its client left while it waited (or while its prefill was spread)
            if job.work is not None:
                job.work.close()
            job.on_error(Cancelled())

    def _places(self) -> int:
        """How many more jobs may start their prefill: free slots and batch places."""
        prefilling = sum(1 for j in self._queued() if isinstance(j, Job) and j.work is not None)
        return min(self.config.max_batch, self.config.slots) - len(self._running) - prefilling

    def _work(self, budget: int) -> bool:
        """Queued work in arrival order while the budget lasts; the first item always runs (so
        that a prefill above the budget is not starved). A job waits while no slot is free; the
        work behind it goes on."""
        first, worked = True, False
        places = self._places()
        for item in self._queued():
            if budget <= 0:
                break
            if isinstance(item, SideWork):
                if not first and item.cost > budget:
                    break
                self._run_side(item)
                budget -= item.cost
                first, worked = False, True
            else:
                if item.work is None:
                    if places <= 0:
                        continue
                    places -= 1
                    self._ensure_slot_fits(item)
                    item.work = PrefillWork(self.engine, item.layout, item.spec, item.kv)
                w = item.work
                # after the first: what does not fit waits, unless it can be spread, and then not
                # for less than one piece of it (a blend layer over the whole prompt)
                if not first and w.left > budget and (not w.chunkable or budget < w.min_piece):
                    break
                budget -= self._advance(item, budget)
                first, worked = False, True
                if w.seq is None:
                    break  # a spread prefill keeps its turn: nothing overtakes it
        return worked

    def _ensure_slot_fits(self, job: Job) -> None:
        """Inline: grow the one slot to the request (nothing is running when a job is admitted)."""
        if self.config is INLINE:
            need = job.layout.n_tokens + job.spec.max_tokens + 1
            self.engine.reserve_decode(1, need, grow_only=True)

    def _run_side(self, work: SideWork) -> None:
        with self._cond:
            self._waiting.remove(work)
        try:
            self._finish_side(work, result=work.fn())
        except Exception as e:  # the caller's to handle; the loop lives
            self._finish_side(work, error=e)

    @staticmethod
    def _finish_side(work: SideWork, result=None, error: BaseException | None = None) -> None:
        work.result, work.error = result, error
        work.done.set()

    def _advance(self, job: Job, budget: int) -> int:
        """Spend up to `budget` on the job's prefill; a finished prefill picks its first token and
        joins the running batch. Returns the tokens spent."""
        w = job.work
        try:
            spent = w.advance(budget)
        except Exception as e:  # the request's own failure (corrupt KV it could not repair, …)
            self._unqueue(job)
            w.close()
            job.on_error(e)
            return w.left
        if w.seq is None:
            return spent
        self._unqueue(job)
        seq = w.seq
        try:
            job.on_start(seq)
            piece = seq.first()
        except Exception as e:
            job.on_error(e)
            return spent
        if piece:
            job.on_piece(piece)
        if seq.done:
            self._done(job, seq)
            return spent
        seq.slot = self.slots.take(seq.result.kv)
        seq.result.kv = None  # the slot holds it now; the prefill's buffer may be reused
        self._running[seq.slot] = (job, seq)
        return spent

    def _unqueue(self, job: Job) -> None:
        with self._cond:
            self._waiting.remove(job)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        rows = {slot: seq for slot, (_, seq) in self._running.items()}
        try:
            logits = self.engine.decoder.step({slot: seq.tokens[-1] for slot, seq in rows.items()})
            nxt = self._next_tokens(logits, rows)  # the step's one host sync
        except Exception:  # a bug of ours in the batched step: every running sequence fails, the loop lives
            log.exception("decode step failed")
            for slot, (job, seq) in list(self._running.items()):
                self.slots.release(slot)
                self._running.pop(slot, None)
                job.on_error(RuntimeError("the decode step failed (logged on the server)"))
            return
        dt = time.perf_counter() - t0
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
