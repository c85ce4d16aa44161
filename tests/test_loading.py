"""The loading controller (blend/loading.py) and what a streamed read leaves in the device tier.
The controller's arithmetic and its place in the query path are checked on the CPU (with a real
LMDB stream handed to the engine); promotion and the streamed path itself on CUDA."""
from __future__ import annotations

import pytest
import torch

from blend.loading import ComputeCost, LoadingController, calibrate
from blend.spec import DEFAULT_MAX_RATIO, BadQuery, BlendConfig, QuerySpec
from store import KVStore, StagedReader
from store.chunkkv import ArrivingKV, ChunkKV
from tests.test_blend import make_layout

# ~1 ms fixed, 1 µs per prompt token, 10 µs per recomputed token
COST = ComputeCost(fixed_ms=1.0, per_token_ms=0.001, per_recomputed_ms=0.01)


def test_the_controller_never_goes_below_the_asked_ratio_nor_above_either_ceiling():
    ctl = LoadingController(COST, ceiling=0.6)
    assert ctl.ratio(0.15, 0.5, 3000, 2900, 10**9) == 0.15  # nothing measured yet: as asked
    for bw in (1e6, 1e8, 1e9, 1e10, 1e12):
        ctl.bytes_per_s = bw
        for requested in (0.0, 0.05, 0.15, 0.3, 0.55):
            for ceiling in (None, 0.2, 0.5, 1.0):
                r = ctl.ratio(requested, ceiling, 3000, 2900, 200 * 10**6)
                assert r >= requested
                if ceiling is None:
                    assert r == requested  # a pinned ratio stays
                else:
                    assert r <= max(requested, min(ceiling, 0.6))


def test_the_controller_raises_the_ratio_to_what_the_load_hides():
    ctl = LoadingController(COST, ceiling=1.0)
    ctl.observe(100 * 10**6, 0.050)  # 2 GB/s
    assert ctl.load_ms(100 * 10**6) == pytest.approx(50.0)
    # a 50 ms load hides 0.8 × 50 = 40 ms: 1 + 3 + 0.01·r·2900 ≤ 40 → r ≤ 1.27, capped at the ceiling 0.5
    assert ctl.ratio(0.15, 0.5, 3000, 2900, 100 * 10**6) == 0.5
    # a 10 ms load hides 8 ms: 4 + 29·r ≤ 8 → r ≤ 0.137 < 0.15: the asked ratio
    assert ctl.ratio(0.15, 0.5, 3000, 2900, 20 * 10**6) == 0.15
    # a 20 ms load hides 16 ms: r ≤ 0.41, kept to a coarse step of 0.05
    assert ctl.ratio(0.15, 0.5, 3000, 2900, 40 * 10**6) == 0.40
    ctl.observe(100 * 10**6, 0.100)  # slower now: the estimate moves towards it, smoothed
    assert 1e9 < ctl.bytes_per_s < 2e9


def test_a_ceiling_below_the_ratio_is_refused():
    with pytest.raises(BadQuery, match="max_ratio"):
        BlendConfig(ratio=0.3, max_ratio=0.2)
    assert BlendConfig(max_ratio=DEFAULT_MAX_RATIO).max_ratio == DEFAULT_MAX_RATIO


class StreamingSource:
    """A ChunkKVSource that always hands the chunks over as a real LMDB stream (as ChunkKVCache
    does on CUDA), so that the CPU engine takes the streamed path's decisions."""

    def __init__(self, cache, store):
        self.cache, self.reader = cache, StagedReader(store, workers=2, pin=False)

    def fetch(self, chunks, layers=None):
        layers = list(range(self.cache.shape.n_layers))
        s = self.reader.stream([self.cache.key(ids) for ids in chunks], layers, self.cache.shape.fingerprint,
                               dtype=self.cache.shape.dtype)
        return ArrivingKV([ChunkKV(t, self.cache.start) for t in s.tensors], layers, s.wait, s.close, s.start,
                          s.block, s.flags, s.seq, packed=s.packed, nbytes=s.nbytes, loaded=s.loaded)

    def refetch(self, chunks):
        return self.cache.fetch(chunks)


def test_a_streamed_request_reports_the_ratio_the_controller_chose_and_feeds_it_the_load(tmp_path, tiny_engines):
    engine = tiny_engines["tiny-llama"]
    layout = make_layout(seed=5)
    store = KVStore(tmp_path / "kv")
    store.configure(kv_format="int8")
    cache = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, stream=False)
    for ids in layout.chunks:
        cache.ensure(ids)
    source = StreamingSource(cache, store)
    ctl = LoadingController(ComputeCost(0.0, 0.0, 1e-9), ceiling=0.5)  # any load hides everything
    engine.loading = ctl
    try:
        asked = QuerySpec("blend", BlendConfig(ratio=0.15, max_ratio=0.4), max_tokens=3)
        first = engine.generate(layout, asked, source).run()
        assert first.ratio == 0.15 and first.requested_ratio == 0.15  # no load measured before it
        assert ctl.bytes_per_s is not None and ctl.bytes_per_s > 0    # ... but it measured its own
        raised = engine.generate(layout, asked, source).run()
        assert raised.ratio == 0.4 and raised.requested_ratio == 0.15 and raised.ratio_raised
        n_chunk = layout.n_chunk_tokens
        assert raised.recomputed_tokens == -(-4 * n_chunk // 10) > first.recomputed_tokens
        pinned = engine.generate(layout, QuerySpec("blend", BlendConfig(ratio=0.15), max_tokens=3), source).run()
        assert pinned.ratio == 0.15 and pinned.token_ids == first.token_ids
        # what the raised ratio computes is exactly a pinned request at that ratio
        same = engine.generate(layout, QuerySpec("blend", BlendConfig(ratio=0.4), max_tokens=3), source).run()
        assert same.token_ids == raised.token_ids and torch.equal(same.first_logits, raised.first_logits)
    finally:
        engine.loading = None
        source.reader.close()
        cache.close()
        store.close()


def test_calibration_fits_a_cost_that_grows_with_the_recomputed_tokens(tiny_engines):
    cost = calibrate(tiny_engines["tiny-llama"], n_chunks=2, chunk_tokens=32, question_tokens=8, runs=2)
    assert cost.per_recomputed_ms >= 0 and cost.per_token_ms >= 0
    assert cost.ms(200, 100) >= cost.ms(200, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@pytest.mark.parametrize("mode,ratio", [("reuse", 0.0), ("blend", 0.15)])
def test_a_streamed_request_leaves_its_chunks_whole_in_the_device_tier(fmt, mode, ratio, tmp_path):
    """On CUDA, after a request streamed its chunks from LMDB, each chunk is in the device tier,
    equal to the entry read whole (every layer, those the prefill skipped too); the next request
    reads nothing from LMDB and answers the same."""
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint
    from blend.shapes import random_model
    from store.serialize import to_kv

    model = random_model("tiny-llama", dtype=torch.bfloat16, device="cuda", seed=0, std=0.1)
    engine = Engine(LoadedModel(model, None, "tiny-llama", fingerprint(model)), cuda_graphs=True, graph_tokens=1024)
    layout = make_layout()
    store = KVStore(tmp_path / "kv")
    store.configure(kv_format=fmt)
    cache = engine.kv_cache(layout.prefix, store=store, gpu_bytes=1 << 30, cpu_bytes=0, read_workers=4)
    for ids in layout.chunks:
        cache.ensure(ids)
    cache.gpu.clear()
    spec = QuerySpec(mode, BlendConfig(ratio=ratio), max_tokens=8)
    first = engine.generate(layout, spec, cache).run()
    assert cache.store_reads == len(layout.chunks)
    for ids in layout.chunks:
        key = cache.key(ids)
        raw, head = store.get_raw(key, fingerprint=engine.fingerprint)
        assert torch.equal(cache.gpu.get(key), to_kv(raw, head, torch.bfloat16, "cuda"))
    again = engine.generate(layout, spec, cache).run()
    assert cache.store_reads == len(layout.chunks) and again.token_ids == first.token_ids
    cache.close()
    store.close()
