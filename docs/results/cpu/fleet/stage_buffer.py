"""A 7B chunk's entry (mistral-7b shape: 32 layers, 8 KV heads, 512 tokens, head dim 128) staged
for a write (store.serialize.stage_kv): into a fresh bytearray, as an in-line write does, and
into a buffer kept from the last entry, as pipelined writes do (store/writes.py). Medians of 12,
in turns, one thread: `OMP_NUM_THREADS=1 python docs/results/cpu/fleet/stage_buffer.py`."""
import statistics
import time

import torch

from store.serialize import stage_kv

kv = torch.randn(32, 2, 8, 512, 128).to(torch.bfloat16)
for fmt in ("bfloat16", "int8"):
    fresh, kept, buf = [], [], None
    for _ in range(12):
        t0 = time.perf_counter()
        out = stage_kv(kv, "fp", fmt, "k" * 64)
        fresh.append(time.perf_counter() - t0)
        buf = buf or out
        t0 = time.perf_counter()
        stage_kv(kv, "fp", fmt, "k" * 64, alloc=lambda n: buf)
        kept.append(time.perf_counter() - t0)
        del out
    print(f"{fmt}: {len(buf) / 1e6:.1f} MB, fresh {statistics.median(fresh) * 1e3:.1f} ms, "
          f"kept buffer {statistics.median(kept) * 1e3:.1f} ms")
