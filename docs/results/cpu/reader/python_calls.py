import os, sys, time, tempfile, threading, collections
from pathlib import Path
import torch
sys.path.insert(0, os.environ.get('RAGBLEND_TREE') or str(Path(__file__).resolve().parents[4]))
from store import KVStore
from store.reader import StagedReader
from store.serialize import encode_kv
L, H, T, D, C = 32, 8, 512, 128, 6
tmp = tempfile.mkdtemp()
st = KVStore(Path(tmp) / "lmdb", map_size=1 << 34); st.configure(kv_format="int8")
g = torch.Generator().manual_seed(0); keys = []
for c in range(C):
    kv = torch.randn(L, 2, H, T, D, generator=g).to(torch.bfloat16)
    k = f"{c:064x}"; st.put_encoded(k, encode_kv(kv, "b", "int8", k), {"n_tokens": T}); keys.append(k)
cnt = collections.Counter()
main = threading.get_ident()
def prof(frame, event, arg):
    if threading.get_ident() != main and event in ("call", "c_call"):
        cnt[event] += 1
threading.setprofile(prof)
rd = StagedReader(st, workers=2, copiers=2, pin=False)
for r in range(3):
    if r == 2: cnt.clear()
    s = rd.stream(keys, range(L), "b", dtype=torch.bfloat16, device="cpu"); s.start(); s.close()
print(dict(cnt), "per layer", {k: v / L for k, v in cnt.items()})
