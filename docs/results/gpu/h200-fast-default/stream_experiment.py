"""Where a streamed LMDB read's time goes on the GPU machine (mistral-7b shape, 6 × 512 + 64):
the host's checksum and copy speed, the reads alone per stored format, and TTFT with the reads
started after the prefill is queued (as served) or at once. Run from the project root:
    python3 docs/results/gpu/h200-fast-default/stream_experiment.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from blend import prefill
from blend.bench import timed_together, ttft
from blend.engine import Engine
from blend.loader import LoadedModel, fingerprint
from blend.shapes import random_layout, random_model
from blend.spec import BlendConfig, Mode, QuerySpec
from store import KVStore

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/stream-exp")
out.mkdir(parents=True, exist_ok=True)
res: dict = {}

buf = os.urandom(64 << 20)
t0 = time.perf_counter()
for _ in range(5):
    zlib.crc32(buf)
res["crc32_GBps_one_thread"] = 5 * 64 / 1024 / (time.perf_counter() - t0)
a = np.frombuffer(buf, dtype=np.uint8)
d = np.empty_like(a)
t0 = time.perf_counter()
for _ in range(5):
    d[...] = a
res["memcpy_GBps_one_thread"] = 5 * 64 / 1024 / (time.perf_counter() - t0)
res["cpus"] = os.cpu_count()
print(res, flush=True)

model = random_model("mistral-7b", dtype=torch.bfloat16, device="cuda", seed=0)
engine = Engine(LoadedModel(model, None, "random:mistral-7b", fingerprint(model)))
layout = random_layout(model.config.vocab_size, 6, 512, 64)
caches = {}
with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("int8", "bfloat16"):
        store = KVStore(Path(tmp) / fmt, map_size=1 << 33)
        store.configure(kv_format=fmt)
        cache = engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, cpu_bytes=0)
        for ids in layout.chunks:
            cache.ensure(ids)
        caches[fmt] = cache
        # the reads alone: plan, start every read, wait for the last
        keys = [cache.key(ids) for ids in layout.chunks]
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            s = cache.reader.stream(keys, list(range(engine.parts.n_layers)), engine.fingerprint,
                                    dtype=torch.bfloat16, device="cuda")
            s.start()
            for jobs in s._jobs.values():
                for _, job in jobs:
                    job.result()
            times.append((time.perf_counter() - t0) * 1e3)
            s.close()
        res[f"read_ms_{fmt}"] = statistics.median(times[2:])
        res[f"read_bytes_{fmt}"] = s.nbytes
        print(fmt, res[f"read_ms_{fmt}"], "ms", s.nbytes / 1e6, "MB", flush=True)

    original = prefill.LayerFeed.__init__

    def early(self, *args, **kw):
        original(self, *args, **kw)
        self.arriving.start()

    def variant(fmt: str, spec: QuerySpec, start_early: bool):
        def fn():
            prefill.LayerFeed.__init__ = early if start_early else original
            try:
                return ttft(engine, layout, spec, caches[fmt])
            finally:
                prefill.LayerFeed.__init__ = original
        return fn

    fns = {}
    for fmt in ("int8", "bfloat16"):
        for spec in (QuerySpec(Mode.REUSE), QuerySpec(Mode.BLEND, BlendConfig(0.15))):
            for e in (False, True):
                fns[f"{spec.mode.value}-{fmt}-{'early' if e else 'queued-first'}"] = variant(fmt, spec, e)
    full_cache = engine.memory_cache(layout)
    fns["full"] = lambda: ttft(engine, layout, QuerySpec(Mode.FULL), full_cache)
    stats = timed_together(fns, engine.device, 3, 15)
    res["ttft"] = {k: v["median_ms"] for k, v in stats.items()}
    for k, v in res["ttft"].items():
        print(f"{k:>32}: {v:7.2f} ms", flush=True)
    for c in caches.values():
        c.close()
(out / "stream_experiment.json").write_text(json.dumps(res, indent=2))
