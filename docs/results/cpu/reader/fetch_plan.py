import os, sys, time, tempfile, cProfile, pstats, torch
from pathlib import Path
sys.path.insert(0, os.environ.get('RAGBLEND_TREE') or str(Path(__file__).resolve().parents[4]))
from transformers import LlamaConfig, LlamaForCausalLM
from blend.engine import Engine
from blend.loader import LoadedModel, fingerprint
from blend.bench import random_layout
from store import KVStore
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, head_dim=128, num_hidden_layers=32,
                  intermediate_size=256, vocab_size=1000, max_position_embeddings=8192)
model = LlamaForCausalLM(cfg).eval()
engine = Engine(LoadedModel(model, None, "x", fingerprint(model)))
layout = random_layout(1000, 6, 512, 64)
tmp = tempfile.mkdtemp()
st = KVStore(Path(tmp) / "kv", map_size=1 << 34); st.configure(kv_format="int8")
cache = engine.kv_cache(layout.prefix, store=st, gpu_bytes=0, cpu_bytes=0); cache.stream = True
for ids in layout.chunks: cache.ensure(ids)
layers = list(range(1, 32))
def one():
    a = cache.fetch(layout.chunks, layers); a.start(); a.close()
for _ in range(3): one()
ts = []
for _ in range(20):
    t = time.perf_counter(); a = cache.fetch(layout.chunks, layers); ts.append(time.perf_counter() - t); a.start(); a.close()
print("fetch (plan) median ms", sorted(ts)[10] * 1e3, type(a).__name__)
pr = cProfile.Profile()
for _ in range(10):
    pr.enable(); a = cache.fetch(layout.chunks, layers); pr.disable(); a.start(); a.close()
pstats.Stats(pr).sort_stats("cumtime").print_stats(25)
import time
keys = [cache.key(ids) for ids in layout.chunks]
with st.snapshot() as txn:
    for _ in range(3):
        t = time.perf_counter(); [st.raw(txn, k) for k in keys]; print("6 raw gets us", (time.perf_counter() - t) * 1e6)
t = time.perf_counter(); [st.header(k) for k in keys]; print("6 headers us", (time.perf_counter() - t) * 1e6)
from store.serialize import open_entry
with st.snapshot() as txn:
    bufs = [st.raw(txn, k) for k in keys]
    t = time.perf_counter(); [open_entry(b, None) for b in bufs]; print("6 open_entry us", (time.perf_counter() - t) * 1e6)
