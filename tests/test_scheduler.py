"""The model's one loop (blend/scheduler.py): sequences decoded together, joining and leaving a
running batch, prefills spread over steps under a token budget, side work (a chunk's KV, a
logprob pass) beside the decoding batch — and through all of it, every request answers exactly
as it does alone and as the slow oracle does (tiny random Llama/Mistral/Qwen2/Qwen3, CPU float32)."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from blend.batch import DecodeBatch, KVSlots
from blend.prefill_work import prefill_cost
from blend.scheduler import Cancelled, Job, SchedulerConfig, SchedulerFull, slot_size
from blend.shapes import TINY_ARCHS
from blend.spec import BlendConfig, ContextOverflow, Mode, QuerySpec
from tests.conftest import oracle_decode, serving
from tests.test_blend import make_layout

ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)
# Different lengths and modes: (chunks, layout seed, mode, ratio, max_tokens)
MIX = [(4, 1, "blend", 0.15, 12), (2, 2, "full", None, 9), (6, 3, "reuse", None, 14), (3, 4, "prefix", None, 6),
       (5, 5, "blend", 0.5, 11)]


def spec_of(mode: str, ratio: float | None, max_tokens: int) -> QuerySpec:
    return QuerySpec(Mode(mode), BlendConfig(ratio=ratio) if ratio is not None else BlendConfig(), max_tokens=max_tokens)


def alone(engine, layout, spec):
    return engine.generate(layout, spec).run()


def oracle(engine, layout, spec) -> list[int]:
    """The slow reference: the engine's prefill, then transformers' forward token by token."""
    kvs = engine.load_chunks(layout, spec.mode, engine.memory_cache(layout), spec.blend)
    result = engine.prefill(layout, spec.mode, kvs, spec.blend)
    return oracle_decode(engine.model, result, spec.max_tokens, spec.sampling, engine.stop_ids)


class Recorder:
    """Collects jobs' outcomes and the scheduler's batch sizes. Chunk KV is computed when a job is
    made, before it is submitted: computing it is model work, which would step the loop."""

    def __init__(self):
        self.answers, self.errors, self.batches, self.started = {}, {}, [], {}
        self.finished = threading.Semaphore(0)

    def job(self, engine, name, layout, spec, **kw) -> Job:
        def done(a):
            self.answers[name] = a
            self.finished.release()

        def error(e):
            self.errors[name] = e
            self.finished.release()
        return Job(layout, spec, engine.memory_cache(layout), on_done=done, on_error=error,
                   on_start=lambda seq: self.started.__setitem__(name, seq), **kw)

    def on_step(self, n: int, dt: float) -> None:
        self.batches.append(n)

    def wait(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.finished.acquire(timeout=timeout), "a job did not finish"


@ARCHS
def test_requests_decoded_together_answer_as_each_does_alone(tiny_engines, arch):
    engine = tiny_engines[arch]
    cases = {i: (make_layout(n, seed), spec_of(m, r, t)) for i, (n, seed, m, r, t) in enumerate(MIX)}
    solo = {i: alone(engine, lay, spec) for i, (lay, spec) in cases.items()}
    rec = Recorder()
    jobs = [rec.job(engine, i, lay, spec) for i, (lay, spec) in cases.items()]
    with serving(engine, rec.on_step, prefill_tokens=4096) as sched:
        for job in jobs:  # all queued before the loop starts: admitted in one step
            sched.submit(job)
        sched.start()
        rec.wait(len(cases))
        assert sched.slots.free == sched.slots.n_slots  # every slot given back
    assert not rec.errors
    assert max(rec.batches) == len(cases)  # they really were decoded in one batch
    for i, a in rec.answers.items():
        assert a.token_ids == solo[i].token_ids == oracle(engine, *cases[i]), i
        assert (a.first_logits - solo[i].first_logits).abs().max().item() < 1e-4
        assert a.recomputed_tokens == solo[i].recomputed_tokens


@ARCHS
@pytest.mark.parametrize("mode", ["full", "prefix"])
def test_a_prefill_spread_over_steps_answers_as_it_does_whole(tiny_engines, arch, mode):
    engine = tiny_engines[arch]
    layout, spec = make_layout(6, 3), spec_of(mode, None, 10)
    whole = alone(engine, layout, spec)
    budget = 8
    with serving(engine, prefill_tokens=budget) as sched:
        rec = Recorder()
        sched.submit(rec.job(engine, "spread", layout, spec))
        steps = 0
        while "spread" not in rec.started:
            assert sched.step()
            steps += 1
        while "spread" not in rec.answers:
            sched.step()
    got = rec.answers["spread"]
    assert steps == math.ceil(prefill_cost(engine.parts.n_layers, layout, spec) / budget) > 3  # really spread
    assert got.token_ids == whole.token_ids == oracle(engine, layout, spec)
    assert (got.first_logits - whole.first_logits).abs().max().item() < 1e-4
    assert got.recomputed_tokens == whole.recomputed_tokens


@ARCHS
@pytest.mark.parametrize("blend", [dict(selection="lookahead"), dict(selection="value", ratio=0.5),
                                   dict(selection="question"), dict(selection="value", check_layer=0, later_checks=(2,))],
                         ids=["lookahead", "value", "question", "gradual"])
def test_a_blend_prefill_spread_over_its_layers_answers_as_it_does_whole(tiny_engines, arch, blend):
    """Blend is cut along its layers (its selection needs every chunk token at the check layer):
    the same kernels in the same order, so the first logits are the whole prefill's bit for bit,
    while running sequences decode between the pieces."""
    engine = tiny_engines[arch]
    layout = make_layout(6, 3)
    spec = QuerySpec(Mode.BLEND, BlendConfig(**{"ratio": 0.15, **blend}), max_tokens=10)
    whole = alone(engine, layout, spec)
    with serving(engine, prefill_tokens=4) as sched:  # 16 tokens through a layer of the 4: a layer a step
        rec = Recorder()
        sched.submit(rec.job(engine, "running", make_layout(2, 5), spec_of("reuse", None, 40)))
        while "running" not in rec.started:
            sched.step()
        running = rec.started["running"]
        sched.submit(rec.job(engine, "spread", layout, spec))
        steps, before = 0, len(running.tokens)
        while "spread" not in rec.started:
            assert sched.step()
            steps += 1
        decoded = len(running.tokens) - before
        while len(rec.answers) < 2:
            sched.step()
    got = rec.answers["spread"]
    assert steps >= engine.parts.n_layers - 1  # really spread, the running sequence decoding in each
    assert decoded == steps
    assert torch.equal(got.first_logits, whole.first_logits)
    assert got.token_ids == whole.token_ids == oracle(engine, layout, spec)
    assert got.recomputed_tokens == whole.recomputed_tokens


def test_a_blend_prefill_starts_beside_another_only_with_a_layers_worth_of_budget_left(tiny_engines):
    """After the step's first prefill, a blend prefill that does not fit starts spread only when
    the budget left covers its first layer (every prompt token through it), else next step."""
    engine = tiny_engines["tiny-llama"]
    lay = make_layout(6, 3)
    spec = QuerySpec(Mode.BLEND, BlendConfig(ratio=0.15), max_tokens=4)
    cost = prefill_cost(engine.parts.n_layers, lay, spec)
    layer = math.ceil(lay.n_tokens / engine.parts.n_layers)
    for spare, starts in ((layer - 1, False), (layer, True)):
        with serving(engine, prefill_tokens=cost + spare) as sched:
            rec = Recorder()
            jobs = [rec.job(engine, name, lay, spec) for name in ("a", "b")]
            for job in jobs:
                sched.submit(job)
            sched.step()
            assert "a" in rec.started and "b" not in rec.started
            assert jobs[1].work.started is starts, spare
            while len(rec.answers) < 2:
                sched.step()
        assert rec.answers["a"].token_ids == rec.answers["b"].token_ids


def test_a_cancelled_spread_blend_prefill_closes_its_streamed_kv(tiny_engines):
    """A client that leaves while its blend prefill is spread over steps: the prefill's coroutine
    is closed at the next step, and the request after it answers as it does alone."""
    engine = tiny_engines["tiny-llama"]
    layout = make_layout(6, 3)
    spec = QuerySpec(Mode.BLEND, BlendConfig(ratio=0.15), max_tokens=6)
    after_lay, after_spec = make_layout(4, 1), spec_of("blend", 0.5, 6)
    solo = alone(engine, after_lay, after_spec)
    with serving(engine, prefill_tokens=8) as sched:
        rec = Recorder()
        job = rec.job(engine, "left", layout, spec)
        sched.submit(job)
        sched.step()
        assert job.work is not None and job.work.started and job.work.seq is None  # mid-prefill
        job.cancelled.set()
        sched.submit(rec.job(engine, "after", after_lay, after_spec))
        while "after" not in rec.answers:
            sched.step()
        assert job.work._pieces is None  # closed
    assert isinstance(rec.errors["left"], Cancelled)
    assert rec.answers["after"].token_ids == solo.token_ids


@pytest.mark.parametrize("budget", [8, 4096], ids=["spread", "whole"])
def test_a_prefills_cache_is_freed_once_its_sequence_joins_the_batch(tiny_engines, budget):
    """The running sequence's KV lives in its slot; the prefill's own cache [L, 2, H, N, D] must
    not outlive the prefill (a spread prefill's suspended pieces once held it for the sequence's
    whole decode: one prompt's KV per running sequence, an OOM under load on a 7B model)."""
    import weakref

    engine = tiny_engines["tiny-llama"]
    caches = {}
    with serving(engine, prefill_tokens=budget) as sched:
        rec = Recorder()
        job = rec.job(engine, "long", make_layout(6, 3), spec_of("full", None, 40))
        on_start = job.on_start
        job.on_start = lambda seq: (caches.__setitem__("kv", weakref.ref(seq.result.kv)), on_start(seq))
        sched.submit(job)
        while "long" not in rec.started:
            sched.step()
        sched.step()
        assert sched.running == 1 and "long" not in rec.answers  # decoding, from its slot
        assert caches["kv"]() is None, "the prefill's cache is still alive"
        while "long" not in rec.answers:
            sched.step()


def test_running_sequences_decode_every_step_while_a_long_prompt_prefills(tiny_engines):
    """Decodes first: a long prefill under a small budget costs each running sequence one step's
    budget of waiting per token, never the whole prefill."""
    engine = tiny_engines["tiny-llama"]
    budget = 8
    with serving(engine, prefill_tokens=budget) as sched:
        rec = Recorder()
        sched.submit(rec.job(engine, "running", make_layout(2, 5), spec_of("reuse", None, 60)))
        while "running" not in rec.started:
            sched.step()
        long_lay, long_spec = make_layout(6, 3), spec_of("full", None, 4)
        sched.submit(rec.job(engine, "long", long_lay, long_spec))
        running = rec.started["running"]
        steps, before = 0, len(running.tokens)
        while "long" not in rec.started:
            sched.step()
            steps += 1
        decoded = len(running.tokens) - before
    assert steps >= math.ceil(long_lay.n_tokens / budget) > 3
    assert decoded == steps  # one token every step the long prompt took


def test_a_request_answers_the_same_beside_an_indexing_job_and_a_logprob_pass(tiny_engines):
    engine = tiny_engines["tiny-qwen2"]
    lay, spec = make_layout(4, 21), spec_of("blend", 0.15, 30)
    solo = alone(engine, lay, spec)
    chunk = make_layout(1, 99).chunks[0]
    ids = torch.tensor([lay.ids()])
    with torch.inference_mode():
        direct_logits = engine.model(input_ids=ids).logits[0, -1]
    direct_chunk = engine.compute_chunk(lay.prefix, chunk).kv.clone()
    rec, side = Recorder(), {}
    job = rec.job(engine, "q", lay, spec)

    def logprob_pass():
        side["running_at_logprobs"] = engine.scheduler.running
        with torch.inference_mode():
            return engine.model(input_ids=ids).logits[0, -1]

    def indexing():
        side["chunk"] = engine.compute_chunk(lay.prefix, chunk).kv
        side["logits"] = engine.run_model(logprob_pass, cost=ids.shape[1])
    with serving(engine) as sched:
        sched.submit(job)
        sched.start()
        while "q" not in rec.started:
            time.sleep(0.001)
        worker = threading.Thread(target=indexing)
        worker.start()
        worker.join(60)
        rec.wait(1)
    assert side["running_at_logprobs"] == 1  # it ran between two decode steps of the request
    assert torch.equal(side["chunk"], direct_chunk)
    assert torch.allclose(side["logits"], direct_logits, atol=1e-5)
    assert rec.answers["q"].token_ids == solo.token_ids
    assert (rec.answers["q"].first_logits - solo.first_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_joining_and_leaving_a_running_batch_change_nobody_elses_tokens(tiny_engines, arch):
    engine = tiny_engines[arch]
    long_lay, long_spec = make_layout(5, 7), spec_of("blend", 0.15, 40)
    short_lay, short_spec = make_layout(2, 8), spec_of("reuse", None, 3)       # leaves early
    late_lay, late_spec = make_layout(3, 9), spec_of("full", None, 10)         # joins mid-way
    gone_lay, gone_spec = make_layout(4, 10), spec_of("blend", 0.3, 40)        # its client leaves
    solo_long, solo_late = alone(engine, long_lay, long_spec), alone(engine, late_lay, late_spec)
    rec = Recorder()
    gone = rec.job(engine, "gone", gone_lay, gone_spec)
    first = [rec.job(engine, "long", long_lay, long_spec), rec.job(engine, "short", short_lay, short_spec), gone]
    late = rec.job(engine, "late", late_lay, late_spec)
    with serving(engine, rec.on_step) as sched:
        for job in first:
            sched.submit(job)
        sched.start()
        deadline = time.time() + 30
        while sched.steps < 8 and time.time() < deadline:
            time.sleep(0.005)
        gone.cancelled.set()
        sched.submit(late)
        rec.wait(4)
        assert sched.slots.free == sched.slots.n_slots
    assert not rec.errors
    assert rec.answers["long"].token_ids == solo_long.token_ids
    assert rec.answers["late"].token_ids == solo_late.token_ids
    assert rec.answers["short"].finish_reason in ("length", "stop") and len(rec.answers["short"].token_ids) <= 3
    assert rec.answers["gone"].finish_reason == "cancelled" and len(rec.answers["gone"].token_ids) < 40


def test_a_cancelled_request_frees_its_memory_at_the_next_step(tiny_engines):
    """Running: its slot is free after one step. Mid-way through a spread prefill: its cache is
    dropped and the room it held is free for the next job."""
    engine = tiny_engines["tiny-mistral"]
    with serving(engine, slots=1, max_batch=1, prefill_tokens=8) as sched:
        rec = Recorder()
        running = rec.job(engine, "running", make_layout(2, 5), spec_of("reuse", None, 50))
        sched.submit(running)
        while "running" not in rec.started:
            sched.step()
        assert sched.slots.free == 0
        running.cancelled.set()
        sched.step()
        assert sched.slots.free == 1 and rec.answers["running"].finish_reason == "cancelled"
        spread = rec.job(engine, "spread", make_layout(6, 3), spec_of("full", None, 5))
        sched.submit(spread)
        sched.step()
        sched.step()
        assert spread.work is not None and spread.work.started and spread.work.seq is None
        spread.cancelled.set()
        sched.step()
        assert "spread" in rec.errors and sched.waiting == 0 and not spread.work.started
        nxt = rec.job(engine, "next", make_layout(2, 6), spec_of("reuse", None, 3))
        sched.submit(nxt)
        while "next" not in rec.answers:
            sched.step()
    assert rec.answers["next"].finish_reason in ("length", "stop")


def test_requests_wait_for_a_free_slot_and_a_full_queue_refuses(tiny_engines):
    engine = tiny_engines["tiny-mistral"]
    rec = Recorder()
    lays = [make_layout(3, s) for s in (11, 12, 13)]
    specs = [spec_of("blend", 0.15, 6)] * 3
    jobs = [rec.job(engine, i, lays[i], specs[i]) for i in range(3)]
    with serving(engine, rec.on_step, slots=1, max_batch=1, max_waiting=2) as sched:
        for i in range(2):
            sched.submit(jobs[i])
        with pytest.raises(SchedulerFull) as refused:
            sched.submit(jobs[2])
        assert refused.value.retry_after >= 1
        sched.start()
        rec.wait(2)
    assert max(rec.batches) == 1  # one slot: they took turns
    for i in range(2):
        assert rec.answers[i].token_ids == alone(engine, lays[i], specs[i]).token_ids


def test_slots_never_exceed_the_memory_bound(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    per_token = KVSlots.bytes_per_token(engine.parts)
    per_slot = per_token * slot_size(300)
    for kv_bytes in (per_slot, 3 * per_slot - 1, 40 * per_slot + 5, 400 * per_slot):
        cfg = SchedulerConfig.for_memory(engine, kv_bytes, slot_tokens=300)
        assert cfg.slots * per_slot <= kv_bytes  # never more than the memory holds
        assert cfg.slots == 256 or kv_bytes < (cfg.slots + 1) * per_slot  # and as many as it holds, to a batch's worth
        assert cfg.max_batch == cfg.slots
    capped = SchedulerConfig.for_memory(engine, 40 * per_slot, slot_tokens=300, max_batch=4)
    assert capped.max_batch == capped.slots == 4  # no slot the batch cannot use
    with pytest.raises(ValueError, match="no slot"):
        SchedulerConfig.for_memory(engine, per_slot - 1, slot_tokens=300)
    cfg = SchedulerConfig.for_memory(engine, 5 * per_slot, slot_tokens=300)
    with serving(engine, **{k: getattr(cfg, k) for k in ("slots", "slot_tokens", "max_batch")}) as sched:
        kv = engine.decoder.slots.kv
        assert kv.numel() * kv.element_size() <= 5 * per_slot
        assert sched.kv_bytes == kv.numel() * kv.element_size()


def test_the_loops_settings_default_to_blend_specs_constants_and_serve_help_says_so():
    """The token budget, the slot length and the memory share are written once (blend/spec.py):
    the scheduler, the memory sizing, the server's settings and `serve --help` all read them."""
    import re

    from typer.testing import CliRunner

    from api.cli import app
    from api.settings import Settings
    from blend.memory import CPU_KV_BYTES
    from blend.spec import CPU_KV_MB, KV_MEMORY_SHARE, PREFILL_TOKENS, SLOT_TOKENS

    settings = Settings()
    assert (settings.prefill_tokens, settings.slot_tokens, settings.kv_memory_share) == (
        PREFILL_TOKENS, SLOT_TOKENS, KV_MEMORY_SHARE)
    assert (SchedulerConfig().prefill_tokens, SchedulerConfig().slot_tokens) == (PREFILL_TOKENS, SLOT_TOKENS)
    assert CPU_KV_BYTES == CPU_KV_MB << 20
    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"}).output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())  # one line, whatever rich wrapped
    for flag, default in (("--prefill-tokens", PREFILL_TOKENS), ("--slot-tokens", SLOT_TOKENS),
                          ("--kv-memory-share", KV_MEMORY_SHARE)):
        own = [part.split(" --", 1)[0] for part in text.split(flag)[1:]]  # the flag's entry, and mentions of it
        assert any(f"default: {default})" in help_text for help_text in own), (flag, own)
    assert f"(default: --kv-memory-share of the GPU memory left free, {CPU_KV_MB} on CPU)" in text


def test_a_request_longer_than_a_slot_is_refused_at_submit(tiny_engines):
    engine = tiny_engines["tiny-llama"]
    lay = make_layout(4)
    job = Job(lay, spec_of("full", None, 250), engine.memory_cache(lay))
    with serving(engine, slots=1, max_batch=1, slot_tokens=64) as sched:
        with pytest.raises(ContextOverflow, match="tokens per sequence"):
            sched.submit(job)


def test_scheduler_generate_is_the_python_api(tiny_engines):
    engine = tiny_engines["tiny-qwen2"]
    lay, spec = make_layout(4, 21), spec_of("blend", 0.15, 8)
    kv = engine.memory_cache(lay)
    with serving(engine, slots=2, max_batch=2) as sched:
        sched.start()
        got = sched.generate(lay, spec, kv, timeout=60)
    assert got.token_ids == alone(engine, lay, spec).token_ids


def test_generations_from_two_threads_at_once_each_answer_as_alone(tiny_engines):
    """Inline: whichever caller waits steps the loop, for everyone's work."""
    engine = tiny_engines["tiny-llama"]
    cases = [(make_layout(3, 31), spec_of("blend", 0.15, 15)), (make_layout(4, 32), spec_of("full", None, 12))]
    solo = [alone(engine, lay, spec).token_ids for lay, spec in cases]
    got: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, alone(engine, *cases[i]).token_ids))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {0: solo[0], 1: solo[1]}


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


@pytest.mark.real
def test_streamed_pieces_join_to_the_whole_answer_decoded_at_once():
    """Incremental detokenization (a few tokens decoded per step) releases exactly the text of the
    whole answer decoded at once, multi-byte characters split across tokens included."""
    from transformers import AutoTokenizer

    from blend.loader import bundled_model_dir
    from blend.prefill import PrefillResult
    from blend.sequence import SeqState

    tok = AutoTokenizer.from_pretrained(bundled_model_dir())
    g = torch.Generator().manual_seed(0)
    texts = ["Ünïcödé — 漢字 and emoji 🎉🎉 mixed with plain words.", " leading space, then\nnew lines  and  gaps"]
    for ids in [tok.encode(t) for t in texts] + [torch.randint(0, tok.vocab_size, (200,), generator=g).tolist()]:
        seq = SeqState(make_layout(1), spec_of("full", None, len(ids)), PrefillResult(torch.zeros(1), None, 0, 0),
                       tok, frozenset(), 0.0, 0.0)
        pieces = "".join(seq.push(t) for t in ids)
        assert pieces == seq.text == tok.decode(ids, skip_special_tokens=True)


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
    jobs = [rec.job(engine, i, lay, spec) for i, (lay, spec) in cases.items()]
    bad = rec.job(engine, "bad", make_layout(2, 9), bad_spec)
    recorded = bad.on_start
    bad.on_start = lambda seq: (break_after_first_token(seq), recorded(seq))
    jobs.append(bad)
    with serving(engine, rec.on_step, prefill_tokens=4096) as sched:
        for job in jobs:
            sched.submit(job)
        sched.start()
        rec.wait(len(cases) + 1)
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
