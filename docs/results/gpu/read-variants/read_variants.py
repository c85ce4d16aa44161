"""Where the host time of a streamed LMDB read goes (mistral-7b shape, 6 × 512 tokens, int8 and
bf16 entries): the same bytes copied into pinned staging under variants that leave one cost out or
change how the work is cut, each the median of 15 after 3 warm-ups. Also: how much a background
read slows a thread that queues small CUDA ops (the prefill's host thread).

Run from the project root: python3 docs/results/gpu/read-variants/read_variants.py OUT"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from store import KVStore
from store.serialize import open_entry

try:
    from zlib_ng import zlib_ng
    crc_ng = zlib_ng.crc32
except ImportError:
    crc_ng = None

warnings.filterwarnings("ignore", message="The given buffer is not writable")
L, H, T, D, CHUNKS = 32, 8, 512, 128, 6
WORKERS = max(1, min(16, (os.cpu_count() or 1) - 2))
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/read-variants")
out.mkdir(parents=True, exist_ok=True)
res: dict = {"cpus": os.cpu_count(), "workers": WORKERS, "zlib_ng": crc_ng is not None}


def median_ms(fn, runs: int = 15, warm: int = 3) -> float:
    ts = []
    for r in range(runs + warm):
        t0 = time.perf_counter()
        fn()
        if r >= warm:
            ts.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ts), 3)


def variants(spans: list[list[memoryview]], crcs: list[list[int]], width: int) -> dict:
    """spans[i][c]: layer i of chunk c in the map; the staging is [L, width] pinned."""
    stage = torch.empty(L * width, dtype=torch.uint8, pin_memory=torch.cuda.is_available()).view(L, width)
    rows = stage.numpy()
    offs = [0]
    for mv in spans[0]:
        offs.append(offs[-1] + len(mv))

    def job_chunk(i, c, crc, copy):
        mv = spans[i][c]
        if crc is not None and crc(mv) != crcs[i][c]:
            raise ValueError("crc")
        if copy:
            rows[i, offs[c]:offs[c + 1]] = np.frombuffer(mv, dtype=np.uint8)

    def job_layer_torch(i, crc, copy):
        if copy:
            torch.cat([torch.frombuffer(mv, dtype=torch.uint8) for mv in spans[i]], out=stage[i, :offs[-1]])
        if crc is not None:
            if copy and crc is crc_ng:  # one pass over the contiguous row: the chunks' crcs combined
                want = crcs[i][0]
                for c in range(1, CHUNKS):
                    want = zlib_ng.crc32_combine(want, crcs[i][c], len(spans[i][c]))
                if crc(memoryview(rows[i, :offs[-1]])) != want:
                    raise ValueError("crc")
            else:  # each chunk's span in the map
                for c in range(CHUNKS):
                    if crc(spans[i][c]) != crcs[i][c]:
                        raise ValueError("crc")

    def pooled(pool, per_layer, crc, copy):
        def run():
            if per_layer:
                futs = [pool.submit(job_layer_torch, i, crc, copy) for i in range(L)]
            else:
                futs = [pool.submit(job_chunk, i, c, crc, copy) for i in range(L) for c in range(CHUNKS)]
            wait(futs)
            for f in futs:
                f.result()
        return run

    r = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        r["chunk_jobs zlib+np (today)"] = median_ms(pooled(pool, False, zlib.crc32, True))
        r["chunk_jobs np copy only"] = median_ms(pooled(pool, False, None, True))
        r["chunk_jobs zlib crc only"] = median_ms(pooled(pool, False, zlib.crc32, False))
        if crc_ng:
            r["chunk_jobs zlib-ng+np"] = median_ms(pooled(pool, False, crc_ng, True))
            r["chunk_jobs zlib-ng crc only"] = median_ms(pooled(pool, False, crc_ng, False))
        r["layer_jobs torch.cat copy only"] = median_ms(pooled(pool, True, None, True))
        r["layer_jobs torch.cat + zlib crc of each span"] = median_ms(pooled(pool, True, zlib.crc32, True))
        if crc_ng:
            r["layer_jobs torch.cat + zlib-ng row crc"] = median_ms(pooled(pool, True, crc_ng, True))
    for w in (2, 4, 8):
        with ThreadPoolExecutor(w) as pool:
            r[f"layer_jobs torch.cat + best crc, {w} workers"] = median_ms(pooled(pool, True, crc_ng or zlib.crc32, True))
            r[f"chunk_jobs zlib+np, {w} workers"] = median_ms(pooled(pool, False, zlib.crc32, True))
    seq = lambda: [job_layer_torch(i, crc_ng or zlib.crc32, True) for i in range(L)]
    r["one thread, layer by layer torch.cat + best crc"] = median_ms(seq, runs=5, warm=1)
    r["bytes"] = L * offs[-1]
    # The prefill's host thread: 600 small CUDA ops, alone and beside each kind of read.
    if torch.cuda.is_available():
        x = torch.zeros(1024, device="cuda")

        def queue():
            for _ in range(600):
                x.add_(1.0)
            torch.cuda.synchronize()

        r["host queue 600 ops alone"] = median_ms(queue)
        for name, per_layer, crc in (("chunk_jobs zlib+np", False, zlib.crc32),
                                     ("layer_jobs torch.cat + best crc", True, crc_ng or zlib.crc32)):
            with ThreadPoolExecutor(WORKERS) as pool:
                def both():
                    if per_layer:
                        futs = [pool.submit(job_layer_torch, i, crc, True) for i in range(L)]
                    else:
                        futs = [pool.submit(job_chunk, i, c, crc, True) for i in range(L) for c in range(CHUNKS)]
                    t0 = time.perf_counter()
                    queue()
                    both.q.append((time.perf_counter() - t0) * 1e3)
                    wait(futs)
                both.q = []
                total = median_ms(both)
                r[f"host queue 600 ops beside {name}"] = round(statistics.median(both.q[3:]), 3)
                r[f"read + queue together, {name}"] = total
    return r


with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("int8", "bfloat16"):
        store = KVStore(Path(tmp) / fmt, map_size=1 << 33)
        store.configure(kv_format=fmt)
        keys = [f"c{c}" for c in range(CHUNKS)]
        for k in keys:
            store.put(k, torch.randn(L, 2, H, T, D, dtype=torch.bfloat16), "fp", {})
        with store.snapshot() as txn:
            spans, crcs = [[None] * CHUNKS for _ in range(L)], [[0] * CHUNKS for _ in range(L)]
            for c, k in enumerate(keys):
                mv, head = open_entry(store.raw(txn, k), "fp")
                for i in range(L):
                    s = head.payload_offset + i * head.layer_nbytes
                    spans[i][c] = mv[s:s + head.layer_nbytes]
                    crcs[i][c] = head.layer_crcs[i]
            width = sum(len(m) for m in spans[0])
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            res[fmt] = variants(spans, crcs, width)
            res[fmt]["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            del spans
        print(fmt, json.dumps(res[fmt], indent=1), flush=True)
        store.close()
(out / "read_variants.json").write_text(json.dumps(res, indent=2))
