"""Continuous batching: sequences decoded together, joining and leaving a running batch, answer
exactly as each would alone (tiny random Llama/Mistral/Qwen2/Qwen3, CPU float32)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from blend.batch import DecodeBatch, KVSlots
from blend.scheduler import Job, Scheduler, SchedulerConfig, SchedulerFull
from blend.shapes import TINY_ARCHS
from blend.spec import BlendConfig, ContextOverflow, Mode, QuerySpec

from tests.test_blend import make_layout

ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)
# Different lengths and modes: (chunks, layout seed, mode, ratio, max_tokens)
MIX = [(4, 1, "blend", 0.15, 12), (2, 2, "full", None, 9), (6, 3, "reuse", None, 14), (3, 4, "prefix", None, 6),
       (5, 5, "blend", 0.5, 11)]


def spec_of(mode: str, ratio: float | None, max_tokens: int) -> QuerySpec:
    return QuerySpec(Mode(mode), BlendConfig(ratio=ratio) if ratio is not None else BlendConfig(), max_tokens=max_tokens)


def alone(engine, layout, spec):
    return engine.generate(layout, spec).run()


class Recorder:
    """Collects a job's outcome and the scheduler's batch sizes."""

    def __init__(self):
        self.answers, self.errors, self.batches = {}, {}, []
        self.lock = threading.Lock()
        self.finished = threading.Semaphore(0)

    def job(self, engine, name, layout, spec, **kw) -> Job:
        def done(a):
            self.answers[name] = a
            self.finished.release()

        def error(e):
            self.errors[name] = e
            self.finished.release()
        return Job(layout, spec, engine.memory_cache(layout), on_done=done, on_error=error, **kw)

    def wait(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.finished.acquire(timeout=timeout), "a job did not finish"


def scheduler(engine, rec: Recorder, **cfg) -> Scheduler:
    config = SchedulerConfig(**{"max_batch": 8, "slots": 8, "slot_tokens": 512, **cfg})
    return Scheduler(engine, config, on_step=lambda n, dt: rec.batches.append(n))


@ARCHS
def test_requests_decoded_together_answer_as_each_does_alone(tiny_engines, arch):
    engine = tiny_engines[arch]
    cases = {i: (make_layout(n, seed), spec_of(m, r, t)) for i, (n, seed, m, r, t) in enumerate(MIX)}
    solo = {i: alone(engine, lay, spec) for i, (lay, spec) in cases.items()}
    rec = Recorder()
    sched = scheduler(engine, rec)
    for i, (lay, spec) in cases.items():  # all queued before the loop starts: admitted together
        sched.submit(rec.job(engine, i, lay, spec))
    sched.start()
    rec.wait(len(cases))
    sched.stop()
    assert not rec.errors
    assert max(rec.batches) == len(cases)  # they really were decoded in one batch
    for i, a in rec.answers.items():
        assert a.token_ids == solo[i].token_ids, i
        assert (a.first_logits - solo[i].first_logits).abs().max().item() < 1e-4
        assert a.recomputed_tokens == solo[i].recomputed_tokens
    assert sched.slots.free == sched.slots.n_slots  # every slot given back


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_joining_and_leaving_a_running_batch_change_nobody_elses_tokens(tiny_engines, arch):
    engine = tiny_engines[arch]
    long_lay, long_spec = make_layout(5, 7), spec_of("blend", 0.15, 40)
    short_lay, short_spec = make_layout(2, 8), spec_of("reuse", None, 3)       # leaves early
    late_lay, late_spec = make_layout(3, 9), spec_of("full", None, 10)         # joins mid-way
    gone_lay, gone_spec = make_layout(4, 10), spec_of("blend", 0.3, 40)        # its client leaves
    solo_long, solo_late = alone(engine, long_lay, long_spec), alone(engine, late_lay, late_spec)
    rec = Recorder()
    sched = scheduler(engine, rec)
    gone = rec.job(engine, "gone", gone_lay, gone_spec)
    for name, lay, spec in (("long", long_lay, long_spec), ("short", short_lay, short_spec)):
        sched.submit(rec.job(engine, name, lay, spec))
    sched.submit(gone)
    sched.start()
    deadline = time.time() + 30
    while sched.steps < 8 and time.time() < deadline:
        time.sleep(0.005)
    gone.cancelled.set()
    sched.submit(rec.job(engine, "late", late_lay, late_spec))
    rec.wait(4)
    sched.stop()
    assert not rec.errors
    assert rec.answers["long"].token_ids == solo_long.token_ids
    assert rec.answers["late"].token_ids == solo_late.token_ids
    assert rec.answers["short"].finish_reason in ("length", "stop") and len(rec.answers["short"].token_ids) <= 3
    assert rec.answers["gone"].finish_reason == "cancelled" and len(rec.answers["gone"].token_ids) < 40
    assert sched.slots.free == sched.slots.n_slots


def test_requests_wait_for_a_free_slot_and_a_full_queue_refuses(tiny_engines):
    engine = tiny_engines["tiny-mistral"]
    rec = Recorder()
    sched = scheduler(engine, rec, slots=1, max_batch=1, max_waiting=2)
    lays = [make_layout(3, s) for s in (11, 12, 13)]
    specs = [spec_of("blend", 0.15, 6)] * 3
    for i in range(2):
        sched.submit(rec.job(engine, i, lays[i], specs[i]))
    with pytest.raises(SchedulerFull) as refused:
        sched.submit(rec.job(engine, 2, lays[2], specs[2]))
    assert refused.value.retry_after >= 1
    sched.start()
    rec.wait(2)
    sched.stop()
    assert max(rec.batches) == 1  # one slot: they took turns
    for i in range(2):
        assert rec.answers[i].token_ids == alone(engine, lays[i], specs[i]).token_ids


def test_a_request_longer_than_a_slot_is_refused_at_submit(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    sched = Scheduler(engine, SchedulerConfig(slots=1, max_batch=1, slot_tokens=64))
    with pytest.raises(ContextOverflow, match="tokens per sequence"):
        sched.submit(Job(make_layout(4), spec_of("full", None, 200), engine.memory_cache(make_layout(4))))


def test_scheduler_generate_is_the_python_api(tiny_engines):
    engine = tiny_engines["tiny-qwen2"]
    lay, spec = make_layout(4, 21), spec_of("blend", 0.15, 8)
    sched = Scheduler(engine, SchedulerConfig(slots=2, max_batch=2, slot_tokens=512)).start()
    try:
        got = sched.generate(lay, spec, engine.memory_cache(lay), timeout=60)
    finally:
        sched.stop()
    assert got.token_ids == alone(engine, lay, spec).token_ids


def test_decode_step_refuses_a_live_slot_left_out(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    slots = KVSlots(engine.parts, 2, 256)
    batch = DecodeBatch(engine.parts, slots)
    kv = torch.zeros(engine.parts.n_layers, 2, engine.parts.n_kv_heads, 5, engine.parts.head_dim)
    a, b = slots.take(kv), slots.take(kv)
    with pytest.raises(ValueError, match="every live slot"):
        batch.step({a: 1})
    slots.release(a)
    slots.release(b)
    assert slots.free == 2 and slots.used_tokens == 0


@pytest.mark.parametrize("arch", TINY_ARCHS[:1])
def test_a_sequence_whose_sampling_fails_ends_alone_and_the_batch_decodes_on(tiny_engines, arch):
    """A failure that belongs to one sequence (its own sampling, here its generator broken once it
    has its first token, so the failure comes inside the batched step) ends that sequence with its
    error; every other sequence of the batch answers exactly as it does alone."""
    from blend.spec import Sampling

    engine = tiny_engines[arch]
    cases = {i: (make_layout(n, seed), spec_of(m, r, t)) for i, (n, seed, m, r, t) in enumerate(MIX[:3])}
    solo = {i: alone(engine, lay, spec) for i, (lay, spec) in cases.items()}
    bad_spec = QuerySpec(Mode.FULL, sampling=Sampling(temperature=1.0, seed=1), max_tokens=8)

    def break_after_first_token(seq):
        first = seq.push

        def push(token):
            piece = first(token)
            seq.generator = object()  # not a torch.Generator: its next sampled token raises
            return piece
        seq.push = push
    rec = Recorder()
    sched = scheduler(engine, rec)
    for i, (lay, spec) in cases.items():
        sched.submit(rec.job(engine, i, lay, spec))
    sched.submit(rec.job(engine, "bad", make_layout(2, 9), bad_spec, on_start=break_after_first_token))
    sched.start()
    rec.wait(len(cases) + 1)
    sched.stop()
    assert set(rec.errors) == {"bad"}, rec.errors
    for i, a in rec.answers.items():
        assert a.token_ids == solo[i].token_ids, i
    assert sched.slots.free == sched.slots.n_slots


def test_pick_survives_temperatures_and_top_p_at_the_edge_of_float32():
    """Validation keeps these out; the sampler still never produces a NaN distribution."""
    from blend.sequence import pick
    from blend.spec import Sampling

    logits = torch.randn(50) * 30
    for t, p in ((1e-37, 1.0), (1e-3, 1e-300), (2.0, 7e-46)):
        s = Sampling()
        object.__setattr__(s, "temperature", t)
        object.__setattr__(s, "top_p", p)
        token = pick(logits, s, torch.Generator().manual_seed(0))
        assert 0 <= token < 50
        if p < 1e-6:
            assert token == int(logits.argmax())
