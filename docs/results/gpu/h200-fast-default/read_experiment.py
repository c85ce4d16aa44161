"""Host-side time of a streamed LMDB read (plan + every layer read and checked), mistral-7b shape,
6 × 512 tokens: int8 planned for the GPU (packed index and block on CUDA), int8 planned on the CPU,
bf16 direct. Run from the project root: python3 docs/results/gpu/h200-fast-default/read_experiment.py OUT"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from store import KVStore, StagedReader

L, H, T, D = 32, 8, 512, 128
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/read-exp")
out.mkdir(parents=True, exist_ok=True)
res = {}
with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("int8", "bfloat16"):
        store = KVStore(Path(tmp) / fmt, map_size=1 << 33)
        store.configure(kv_format=fmt)
        keys = []
        for c in range(6):
            store.put(f"c{c}", torch.randn(L, 2, H, T, D, dtype=torch.bfloat16), "fp", {})
            keys.append(f"c{c}")
        reader = StagedReader(store, pin=True)
        for device in ("cuda", "cpu"):
            plan_ms, read_ms = [], []
            for _ in range(14):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                s = reader.stream(keys, list(range(L)), "fp", dtype=torch.bfloat16, device=device)
                t1 = time.perf_counter()
                s.start()
                for jobs in s._jobs.values():
                    for _, job in jobs:
                        job.result()
                t2 = time.perf_counter()
                s.close()
                del s
                plan_ms.append((t1 - t0) * 1e3)
                read_ms.append((t2 - t1) * 1e3)
            res[f"{fmt}-{device}"] = {"plan_ms": statistics.median(plan_ms[2:]), "read_ms": statistics.median(read_ms[2:])}
            print(fmt, device, res[f"{fmt}-{device}"], flush=True)
        reader.close()
        store.close()
(out / "read_experiment.json").write_text(json.dumps(res, indent=2))
