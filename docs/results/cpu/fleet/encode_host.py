"""The host part of encode_kv for one mistral-7b-shaped 512-token chunk (bf16 [32, 2, 8, 512, 128],
67 MB): with the bfloat16 format the encode is a view, so what is timed is the copies, allocations
and CRCs that follow it. Run from the repo root: python docs/results/cpu/fleet/encode_host.py"""
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from store.serialize import encode_kv  # noqa: E402

kv = torch.randn(32, 2, 8, 512, 128, dtype=torch.bfloat16)
times = []
for _ in range(9):
    t0 = time.perf_counter()
    value = encode_kv(kv, "fp", "bfloat16", "k")
    times.append(time.perf_counter() - t0)
print(f"encode_kv, bfloat16, {len(value) / 1e6:.1f} MB: median {statistics.median(times[1:]) * 1e3:.1f} ms")
