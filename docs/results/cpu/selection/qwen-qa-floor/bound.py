"""Chunk-boundary tokens (each chunk's first token and its trailing separator) on Qwen (issue 21):
their stale KV's deviation from full's against the other chunk tokens', and lookahead with them
always recomputed (same budget)."""
import sys, json
from pathlib import Path
import torch
torch.set_num_threads(1)
from api.cli_common import load_engine
from api.cli_eval import _dataset
from eval.layouts import fit_to_context
from blend.prompt import Layout
from blend.prefill import prefill_full, prefill_cached, fill_cache
from blend.spec import BlendConfig
from eval.metrics import kl_first_token
import blend.prefill as P

model, data, ddir, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ratios = [0.15, 0.3]
eng = load_engine(model, "cpu", "float32")
ds, retr = _dataset(data, None if ddir == '-' else Path(ddir), 90, limit)
orig = P.score
boost = {}
def score(sel, check):
    s = orig(sel, check)
    if "b" in boost:
        s = s.clone(); s[boost["b"]] = float("inf")
    return s
P.score = score
parts = eng.parts
agg = {}
def add(k, v): agg.setdefault(k, []).append(v)
for ex in ds.examples[:limit]:
    chunks = list(ex.chunks if ex.chunks is not None else retr(ex.question, 5))
    layout, _ = fit_to_context(eng, ex, chunks, 4)
    if ex.chunks is None:
        layout = Layout(layout.prefix, layout.chunks[::-1], layout.suffix)
    ckv = eng.memory_cache(layout).fetch(layout.chunks)
    full = prefill_full(eng.model, layout)
    pre = eng.prefix_kv(layout.prefix)
    lens = [len(c) for c in layout.chunks]
    offs = [sum(lens[:j]) for j in range(len(lens))]
    b = torch.zeros(layout.n_chunk_tokens, dtype=torch.bool)
    for j in range(1, len(lens)):
        b[offs[j]] = True; b[offs[j] + lens[j] - 1] = True
    stale = fill_cache(parts, layout, pre, ckv)
    reuse = prefill_cached(parts, layout, pre, ckv, "reuse")
    Pn, S = layout.n_prefix, layout.suffix_start
    rec = {"id": ex.id, "reuse": kl_first_token(full.logits, reuse.logits)}
    for r in ratios:
        boost.pop("b", None)
        rec[f"la@{r}"] = kl_first_token(full.logits, prefill_cached(parts, layout, pre, ckv, "blend", BlendConfig(ratio=r, check_layer=1, selection="lookahead")).logits)
        boost["b"] = b
        rec[f"la+b@{r}"] = kl_first_token(full.logits, prefill_cached(parts, layout, pre, ckv, "blend", BlendConfig(ratio=r, check_layer=1, selection="lookahead")).logits)
        boost.pop("b", None)
    # relative deviation of boundary vs other tokens, per layer band
    d = (stale[:, :, :, Pn:S] - full.kv[:, :, :, Pn:S]).float().square().sum(dim=(2, 4))  # [L,2,C]
    nrm = full.kv[:, :, :, Pn:S].float().square().sum(dim=(2, 4))
    elig = torch.zeros_like(b); elig[lens[0]:] = True
    rel = (d / nrm.clamp_min(1e-12))  # per token relative deviation
    L = rel.shape[0]
    for band, sl in (("early", slice(0, L // 3)), ("mid", slice(L // 3, 2 * L // 3)), ("late", slice(2 * L // 3, L))):
        rec[f"relV_{band}_bound"] = float(rel[sl, 1][:, b].mean()); rec[f"relV_{band}_other"] = float(rel[sl, 1][:, elig & ~b].mean())
        rec[f"normV_{band}_bound"] = float(nrm[sl, 1][:, b].mean() / nrm[sl, 1][:, elig & ~b].mean())
    for k, v in rec.items():
        if k != "id": add(k, v)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
print("MEAN", json.dumps({k: round(sum(v) / len(v), 4) for k, v in agg.items()}))
