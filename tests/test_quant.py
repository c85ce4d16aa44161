"""Quantized chunk KV (store/quant.py), the store's recorded format, its size cap with LRU
eviction, and the cost `ragblend index` prints before it starts. One property each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blend.spec import BlendConfig, QuerySpec
from store import CorruptEntry, KVStore, StagedReader, decode_kv, encode_kv
from store.quant import FORMATS, kv_format
from store.serialize import entry_nbytes, read_header
from store.tiers import ChunkKVCache, KVShape
from tests.test_blend import make_layout

ROOT = Path(__file__).resolve().parents[1]
FP = "fp-quant"
LOSSY = ("bfloat16", "float16", "fp8", "int8")


def realistic_kv(L=4, H=3, T=96, D=64, seed=0) -> torch.Tensor:
    """Keys with a few large channels (as real keys have), values spread per token."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(L, 2, H, T, D, generator=g)
    kv[:, 0, :, :, :4] *= 30.0
    kv[:, 0] += torch.randn(L, H, 1, D, generator=g) * 2  # per-channel offsets
    kv[:, 1] *= torch.rand(L, H, T, 1, generator=g) * 4
    return kv


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_round_trips_within_its_stated_error_bound(name):
    kv = realistic_kv()
    fmt = FORMATS[name]
    got = decode_kv(encode_kv(kv, FP, name), expect_fingerprint=FP, dtype=torch.float32)
    assert got.shape == kv.shape and got.dtype == torch.float32
    err = (got - kv).abs()
    slack = 2e-6 * kv.abs().amax()  # float32 rounding of the scale arithmetic
    assert bool((err <= fmt.error_bound(kv) + slack).all()), f"{name}: max excess {(err - fmt.error_bound(kv)).max()}"
    if name == "float32":
        assert torch.equal(got, kv)
    # what the tiers serve without the bytes leaving the device is the same tensor
    assert torch.equal(fmt.roundtrip(kv), got)


def test_quantized_entries_are_the_promised_fraction_of_float32():
    L, H, T, D = 30, 3, 128, 64  # SmolLM2's KV shape, a 128-token chunk
    full = entry_nbytes("float32", FP, L, H, T, D)
    assert entry_nbytes("int8", FP, L, H, T, D) <= 0.30 * full
    assert entry_nbytes("fp8", FP, L, H, T, D) <= 0.27 * full
    assert entry_nbytes("bfloat16", FP, L, H, T, D) <= 0.51 * full
    kv = realistic_kv(L, H, T, D)
    for name in FORMATS:
        assert len(encode_kv(kv, FP, name, "k" * 64)) == entry_nbytes(name, FP, L, H, T, D)


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("where", ["value", "scale"])
def test_a_corrupted_quantized_value_or_scale_is_detected(name, where, tmp_path):
    kv = realistic_kv(L=3, T=20)
    buf = bytearray(encode_kv(kv, FP, name))
    head = read_header(buf)
    layer = 1
    start = head.payload_offset + layer * head.layer_nbytes
    # scales sit at the start of a layer's row, the quantized values after them
    buf[start + (1 if where == "scale" else head.layer_nbytes - 200)] ^= 0x04
    with pytest.raises(CorruptEntry, match=f"layer {layer}"):
        decode_kv(bytes(buf))
    assert decode_kv(bytes(buf), layers=[0, 2], dtype=torch.float32).shape[0] == 2  # the others still verify
    with KVStore(tmp_path / "kv") as store:
        store.put("k", kv, FP, {}, fmt=name)
        with store._env.begin(write=True) as txn:
            txn.put(b"k", bytes(buf), db=store._kv)
        with pytest.raises(CorruptEntry, match="entry k"):
            store.get("k", fingerprint=FP)


SHAPE = KVShape("fp-tiers", n_layers=3, n_kv_heads=2, head_dim=16, dtype=torch.float32)
PREFIX = [1, 2, 3]


def kv_of(ids: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(ids) * 7919 + len(ids))
    return torch.randn(SHAPE.n_layers, 2, SHAPE.n_kv_heads, len(ids), SHAPE.head_dim, generator=g)


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, ids):
        self.calls += 1
        return kv_of(ids)


def test_a_store_written_in_one_format_is_read_in_it_after_a_restart(tmp_path):
    chunks = [[5, 6, 7, 8], list(range(20, 40)), [9] * 11]
    with KVStore(tmp_path / "kv") as store:
        store.configure(kv_format="int8")
        cache = ChunkKVCache(SHAPE, PREFIX, Counting(), device=torch.device("cpu"), store=store)
        assert cache.format.name == "int8"
        for ids in chunks:
            cache.ensure(ids)
    with KVStore(tmp_path / "kv") as store:  # a new process: nothing but the data dir
        assert store.kv_format == "int8"
        compute = Counting()
        cache = ChunkKVCache(SHAPE, PREFIX, compute, device=torch.device("cpu"), store=store)
        assert cache.format.name == "int8"  # the recorded format, though the model is float32
        got = cache.fetch(chunks)
        assert compute.calls == 0 and cache.store_reads == 3
        for c, ids in zip(got, chunks):
            assert c.kv.dtype == torch.float32
            assert torch.equal(c.kv, FORMATS["int8"].roundtrip(kv_of(ids)))
            assert read_header(store._txn(lambda t: bytes(t.get(cache.key(ids).encode(), db=store._kv)),
                                          write=False)).fmt.name == "int8"
        with pytest.raises(ValueError, match="holds int8 KV"):
            store.configure(kv_format="fp8")
        # a recomputed chunk answers exactly like the stored one did
        store.delete(cache.key(chunks[1]))
        cache.gpu.clear()
        again = cache.fetch(chunks)
        assert compute.calls == 1 and all(torch.equal(a.kv, b.kv) for a, b in zip(got, again))


@pytest.mark.parametrize("name", ["int8", "fp8", "bfloat16"])
def test_a_streamed_read_decodes_each_layer_like_a_whole_read(name, tmp_path):
    """Quantized entries (and a float format wanted in another dtype) stream as packed rows with
    arrival flags; a layer decoded from them, by wait() or by the GPU-side decode_into, equals the
    same layer of each entry read whole, bit for bit."""
    with KVStore(tmp_path / "kv") as store:
        kvs = {f"k{i}": realistic_kv(L=4, H=2, T=5 + 3 * i, D=16, seed=i) for i in range(3)}
        for k, kv in kvs.items():
            store.put(k, kv, FP, {}, fmt=name)
        reader = StagedReader(store, workers=2, slots=4, pin=False)
        keys = ["k2", "k0", "k1"]
        with reader.stream(keys, [3, 1, 2], FP, dtype=torch.float32) as s:
            assert s.flags is not None and s.packed is not None
            for i in (3, 1, 2):
                s.wait(i)
                assert int(s.flags[i]) == s.seq  # announced once in place
            assert int(s.flags[0]) != s.seq      # a layer not asked for is never announced
            wholes = [store.get(k, fingerprint=FP, dtype=torch.float32) for k in keys]
            for t, whole in zip(s.tensors, wholes):
                assert torch.equal(t[1:], whole[1:])
            for i in (1, 2, 3):
                out = torch.full((2, 2, s.block.shape[3], 16), float("nan"))
                s.packed.decode_into(i, out)
                assert torch.equal(out, torch.cat([w[i] for w in wholes], dim=2))
        reader.close()


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_a_corrupt_layer_in_a_packed_stream_is_announced_then_fails_naming_its_entry(name, tmp_path):
    """Copy first, verify after: a packed layer's flag rises once its bytes are in staging, and its
    checksum (one over the packed row, against the chunks' combined) still catches a flipped byte,
    naming the entry, at the wait for that layer and, where nobody waited, at close."""
    with KVStore(tmp_path / "kv") as store:
        for k, seed in (("good", 0), ("bad", 1)):
            store.put(k, realistic_kv(L=4, H=2, T=6, D=16, seed=seed), FP, {}, fmt=name)
        raw = bytearray(store._env.begin(db=store._kv).get(b"bad"))
        raw[-3] ^= 0x10  # in the last layer
        with store._env.begin(write=True, db=store._kv) as txn:
            txn.put(b"bad", bytes(raw))
        reader = StagedReader(store, workers=2, slots=4, pin=False)
        with reader.stream(["good", "bad"], range(4), FP, dtype=torch.float32) as s:
            for i in range(3):
                s.wait(i)
            with pytest.raises(CorruptEntry, match="entry bad: checksum mismatch in layer 3"):
                s.wait(3)
        s = reader.stream(["good", "bad"], range(4), FP, dtype=torch.float32)
        with pytest.raises(CorruptEntry, match="entry bad: checksum mismatch in layer 3"):
            s.close()
        assert s.flags[:4].tolist() == [s.seq] * 4
        reader.close()


def test_a_stream_of_entries_in_different_formats_is_refused_before_any_read(tmp_path):
    with KVStore(tmp_path / "kv") as store:
        store.put("a", realistic_kv(L=2, H=2, T=4, D=16), FP, {}, fmt="int8")
        store.put("b", realistic_kv(L=2, H=2, T=4, D=16, seed=1), FP, {}, fmt="fp8")
        reader = StagedReader(store, workers=2, slots=4, pin=False)
        with pytest.raises(ValueError, match="stored as fp8"):
            reader.stream(["a", "b"], [0, 1], FP, dtype=torch.float32)
        reader.close()


def test_the_cap_evicts_the_least_recently_used_entry_and_counts_it(tmp_path):
    kv = realistic_kv(L=2, H=2, T=16, D=16)
    one = entry_nbytes("int8", FP, 2, 2, 16, 16, key_len=1) + 2  # + its meta, "{}"; keys of one letter
    with KVStore(tmp_path / "kv") as store:
        store.configure(kv_format="int8", max_bytes=3 * one)
        for k in ("a", "b", "c"):
            store.put(k, kv, FP, {})
        assert store.get("a", fingerprint=FP) is not None  # a is now the most recently used
        assert store.get("zz") is None
        store.put("d", kv, FP, {})
        assert sorted(store.keys()) == ["a", "c", "d"]  # b, the least recently used, went
        store.put("e", kv, FP, {})
        assert sorted(store.keys()) == ["a", "d", "e"]
    with KVStore(tmp_path / "kv", readonly=True) as ro:  # settings and counts survive a restart
        st = ro.stats()
        assert st["max_bytes"] == 3 * one and st["cap_used_bytes"] == st["bytes"] == 3 * one
        assert (st["evictions"], st["hits"], st["misses"], st["kv_format"]) == (2, 1, 1, "int8")
    with KVStore(tmp_path / "kv") as store:
        assert not store.put("big", realistic_kv(L=2, H=2, T=200, D=16), FP, {})  # larger than the cap
        assert "big" not in store and len(store) == 3
        store.configure(max_bytes=one)  # lowering the cap evicts down to it at once
        assert list(store.keys()) == ["e"] and store.usage()["bytes"] == one


def test_eviction_under_a_small_cap_keeps_greedy_answers_equal_to_the_uncapped_store(tmp_path, tiny_engines):
    engine = tiny_engines["tiny-llama"]
    layouts = [make_layout(seed=s) for s in (1, 2, 3)]
    caches = []
    for name, cap in (("uncapped", None), ("capped", 2)):
        store = KVStore(tmp_path / name)
        cache = engine.kv_cache(layouts[0].prefix, store=store, gpu_bytes=0)
        one = max(entry_nbytes("int8", engine.fingerprint, 2, 2, 20, 16), 1)
        store.configure(kv_format="int8", max_bytes=None if cap is None else 4 * one)  # ~2 of the 12 chunks
        cache.format = kv_format("int8")
        for layout in layouts:
            for ids in layout.chunks:
                cache.ensure(ids)
        caches.append((store, cache))
    (free_store, free), (capped_store, capped) = caches
    specs = [QuerySpec("reuse", max_tokens=8), QuerySpec("blend", BlendConfig(ratio=0.15), max_tokens=8)]
    for _ in range(2):  # twice: the second pass reads back what the first recomputed and wrote
        for layout in layouts:
            for spec in specs:
                a = engine.generate(layout, spec, free).run()
                b = engine.generate(layout, spec, capped).run()
                assert a.token_ids == b.token_ids
                assert torch.equal(a.first_logits, b.first_logits)
    assert capped.recomputed > 0 and free.recomputed == 0
    assert capped_store.usage()["evictions"] > 0 and capped_store.usage()["bytes"] <= capped_store.max_bytes
    for store, cache in caches:
        cache.close()
        store.close()


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("mode,ratio", [("reuse", 0.0), ("blend", 0.15)])
def test_a_quantized_stream_answers_bit_for_bit_like_the_same_entries_read_whole(name, mode, ratio, tmp_path,
                                                                                tiny_engines):
    """CPU: the chunks streamed from LMDB (packed rows, decoded per layer) give the prefill the
    very KV that reading each entry whole gives: same logits to the bit, same greedy tokens."""
    from store.chunkkv import ArrivingKV, ChunkKV

    engine = tiny_engines["tiny-llama"]
    layout = make_layout(seed=4)
    store = KVStore(tmp_path / "kv")
    store.configure(kv_format=name)
    whole = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, stream=False)
    for ids in layout.chunks:
        whole.ensure(ids)
    reader = StagedReader(store, workers=2, pin=False)
    layers = list(range(engine.parts.n_layers))
    spec = BlendConfig(ratio=ratio)

    def streamed() -> ArrivingKV:
        s = reader.stream([whole.key(ids) for ids in layout.chunks], layers, engine.fingerprint,
                          dtype=engine.parts.dtype)
        assert s.packed is not None
        return ArrivingKV([ChunkKV(t, whole.start) for t in s.tensors], layers, s.wait, s.close, s.start,
                          s.block, s.flags, s.seq, s.packed)

    a = engine.prefill(layout, mode, streamed(), spec)
    b = engine.prefill(layout, mode, whole.fetch(layout.chunks), spec)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.kv, b.kv)
    reader.close()
    whole.close()
    store.close()


def _index(root: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", "index", str(root), "--data-dir", str(data),
                           "--model", "random:tiny-smol", "--chunk-tokens", "48", "--json", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.real  # random:tiny-smol speaks the bundled SmolLM2 tokenizer
def test_index_prints_its_estimate_refuses_past_the_cap_and_evicts_when_told(tmp_path):
    data = tmp_path / "data"
    refused = _index(ROOT / "samples" / "corpus", data, "--max-store-gb", "0.0001")
    assert refused.returncode == 2
    assert "estimate:" in refused.stderr and "--allow-eviction" in refused.stderr
    done = _index(ROOT / "samples" / "corpus", data, "--max-store-gb", "0.0001", "--allow-eviction")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    est, store = summary["estimate"], summary["store"]
    assert est["kv_format"] == store["kv_format"] == "int8"  # the default, recorded
    assert store["max_bytes"] == 10**5 < est["estimated_bytes"] and store["bytes"] <= 10**5
    assert store["evictions"] > 0
    # without a cap the estimate is what the store then holds (within 5%; it is exact)
    free = _index(ROOT / "samples" / "corpus", tmp_path / "free")
    s = json.loads(free.stdout.strip().splitlines()[-1])
    assert abs(s["store"]["grew_bytes"] - s["estimate"]["estimated_bytes"]) <= 0.05 * s["estimate"]["estimated_bytes"]
    stats = json.loads(subprocess.run([sys.executable, "-m", "api.cli", "store", "stats", "--data-dir", str(data)],
                                      capture_output=True, text=True, timeout=120, cwd=ROOT).stdout)
    assert stats["max_bytes"] == 10**5 and stats["evictions"] == store["evictions"] and stats["kv_format"] == "int8"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("mode,ratio,selection", [("reuse", 0.0, "value"), ("blend", 0.15, "value"),
                                                  ("blend", 0.15, "lookahead")])
def test_quantized_kv_streamed_to_the_gpu_answers_like_the_same_format_in_gpu_memory(name, mode, ratio, selection,
                                                                                    tmp_path, monkeypatch):
    """On CUDA: quantized rows stream from LMDB packed per layer, with arrival flags the side
    stream waits on, and are copied and dequantized there (no host wait per layer). That answer
    is bit-identical to the same stream decoded with the host waiting per layer; it equals
    (greedy tokens; logits within bf16 rounding of the graph path) the same format's KV held in
    GPU memory and read whole. A corrupt layer voids the prefill and the request recovers by
    recomputing that chunk, like a float stream."""
    from blend import hostwait
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint
    from blend.shapes import random_model
    from store.chunkkv import ArrivingKV
    from store.serialize import CorruptEntry

    assert hostwait.available()
    model = random_model("tiny-llama", dtype=torch.bfloat16, device="cuda", seed=0, std=0.1)
    engine = Engine(LoadedModel(model, None, "tiny-llama", fingerprint(model)), cuda_graphs=True, graph_tokens=1024)
    layout = make_layout()
    mem = engine.kv_cache(layout.prefix, gpu_bytes=1 << 40, stream=False, kv_format=name)
    for ids in layout.chunks:
        mem.ensure(ids)
    store = KVStore(tmp_path / "kv")
    store.configure(kv_format=name)
    streamed = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, cpu_bytes=0, read_workers=4)
    whole = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, cpu_bytes=0, stream=False)
    for ids in layout.chunks:
        streamed.ensure(ids)
    spec = QuerySpec(mode, BlendConfig(ratio=ratio, selection=selection), max_tokens=16)
    kvs = engine.load_chunks(layout, mode, streamed, spec.blend)
    assert isinstance(kvs, ArrivingKV) and kvs.flags is not None and kvs.packed is not None
    kvs.close()
    engine.generate(layout, spec, mem).run()  # warm-up: the first run on a fresh engine captures its graphs
    ref = engine.generate(layout, spec, mem).run()
    gpu_side = engine.generate(layout, spec, streamed).run()
    with monkeypatch.context() as m:
        m.setattr(hostwait, "available", lambda: False)
        host_waited = engine.generate(layout, spec, streamed).run()
    assert gpu_side.token_ids == host_waited.token_ids
    assert torch.equal(gpu_side.first_logits, host_waited.first_logits)
    for got in (gpu_side, engine.generate(layout, spec, whole).run()):
        assert got.token_ids == ref.token_ids
        assert (got.first_logits - ref.first_logits).abs().max().item() < 0.02 * max(1.0, ref.first_logits.abs().max().item())
    assert streamed.recomputed == 0 and whole.recomputed == 0

    bad = streamed.key(layout.chunks[1])
    raw = bytearray(store._env.begin(db=store._kv).get(bad.encode()))
    raw[-5] ^= 0x10  # in the last layer's values
    with store._env.begin(write=True, db=store._kv) as txn:
        txn.put(bad.encode(), bytes(raw))
    kvs = engine.load_chunks(layout, mode, streamed, spec.blend)
    with pytest.raises(CorruptEntry, match=f"entry {bad}"):  # the prefill alone reports it
        engine.prefill(layout, mode, kvs, spec.blend)
    again = engine.generate(layout, spec, streamed).run()  # the query path recomputes the chunk
    assert again.token_ids == ref.token_ids and streamed.recomputed == 1
    for c in (streamed, whole, mem):
        c.close()
    store.close()


@pytest.mark.real  # random:tiny-smol speaks the bundled SmolLM2 tokenizer
def test_a_data_dir_first_filled_through_the_api_records_and_writes_the_default_format(tmp_path):
    """The default format is decided by the store a data dir opens, not by the CLI: a server whose
    data dir is new writes its first upload's KV in it (int8)."""
    from store.quant import DEFAULT_FORMAT
    from tests.test_api import launch, wait_job

    server = launch(tmp_path)
    try:
        r = server.http.post("/v1/documents", json={"id": "d", "text": "The okapi lives in the forest. " * 20})
        assert r.status_code == 202, r.text
        assert wait_job(server.http, r.json()["job_id"])["status"] == "succeeded"
        with KVStore(server.data_dir / "kv", readonly=True) as store:
            assert store.kv_format == DEFAULT_FORMAT == "int8"
            keys = list(store.keys())
            assert keys and all(store.header(k).fmt.name == "int8" for k in keys)
    finally:
        server.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_one_kernel_decode_equals_the_torch_decode_bit_for_bit(name, dtype):
    """On CUDA a packed quantized layer decodes in one Triton launch, into a strided view of a
    fused cache, to exactly what the torch path gives (skipped where Triton is missing)."""
    from store import quant_triton

    if quant_triton.triton is None:
        pytest.skip("Triton is not installed")
    fmt, H, D, lengths = FORMATS[name], 8, 128, (512, 300, 77, 511)
    row = torch.cat([fmt.encode(realistic_kv(L=1, H=H, T=T, D=D, seed=T).cuda()) for T in lengths], dim=1)[0]
    index = fmt.packed_index(H, D, lengths, "cuda")
    want = fmt.decode_packed(row, H, D, lengths, torch.empty(2, H, sum(lengths), D, dtype=dtype, device="cuda"),
                             index, kernel=False)
    cache = torch.full((3, 2, H, 40 + sum(lengths) + 9, D), float("nan"), dtype=dtype, device="cuda")
    out = cache[1, :, :, 40:40 + sum(lengths)]
    assert quant_triton.decode(fmt, row, H, D, lengths, out, index)
    assert torch.equal(out, want)
    assert cache[1, :, :, :40].isnan().all() and cache[1, :, :, -9:].isnan().all() and cache[0].isnan().all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_several_layers_rows_decode_like_each_layer_alone(name, device):
    """decode_packed_rows (a lookahead probe's layers in one copy and, on CUDA, one launch) writes
    exactly what decode_packed gives layer by layer, into a strided view, and nothing around it."""
    from store import quant_triton

    fmt, H, D, lengths = FORMATS[name], 4, 64, (37, 64, 5)
    n_layers, S = 3, sum(lengths)
    rows = torch.cat([fmt.encode(realistic_kv(L=n_layers, H=H, T=T, D=D, seed=T).to(device)) for T in lengths], dim=1)
    index = fmt.packed_index(H, D, lengths, device)
    want = torch.stack([fmt.decode_packed(rows[i], H, D, lengths, torch.empty(2, H, S, D, device=device), index,
                                          kernel=False) for i in range(n_layers)])
    cache = torch.full((n_layers + 2, 2, H, 7 + S + 3, D), float("nan"), device=device)
    out = cache[1:1 + n_layers, :, :, 7:7 + S]
    fmt.decode_packed_rows(rows, H, D, lengths, out, index)
    assert torch.equal(out, want)
    assert cache[0].isnan().all() and cache[-1].isnan().all()
    assert cache[1:1 + n_layers, :, :, :7].isnan().all() and cache[1:1 + n_layers, :, :, -3:].isnan().all()
    if device == "cuda" and quant_triton.triton is not None:
        assert quant_triton._state["ok"], "the Triton decode turned itself off"
