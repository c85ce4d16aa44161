"""Token-wise vs chunk-wise recompute at the same budget (issue 21): if the KL is carried by
whole chunks left stale among fresh ones, spending the budget on whole chunks should beat
spreading it over the best-scored tokens of every chunk."""
import sys, json
from pathlib import Path
import torch
torch.set_num_threads(1)
from api.cli_common import load_engine
from api.cli_eval import _dataset
from eval.layouts import fit_to_context
from blend.prompt import Layout
from blend.prefill import prefill_full, prefill_cached
from blend.spec import BlendConfig
from eval.metrics import kl_first_token
import blend.prefill as P

model, data, ddir, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ratios = [0.15, 0.3]
eng = load_engine(model, "cpu", "float32")
ds, retr = _dataset(data, None if ddir == '-' else Path(ddir), 90, limit)
orig = P.score
mode = {}
def score(sel, check):
    s = orig(sel, check)
    if mode.get("m") == "chunk":  # each chunk's summed score, broadcast: whole chunks, best first
        out, pos = s.clone(), 0
        for n in check.chunk_lengths:
            seg = s[pos:pos + n]
            fin = seg[torch.isfinite(seg)]
            out[pos:pos + n] = (fin.sum() if fin.numel() == n else float("-inf")) + 1e-6 * seg.clamp(min=0)
            pos += n
        return out
    if mode.get("m") == "nearest":  # the chunk tokens nearest the question first
        r = torch.arange(s.numel(), dtype=torch.float32)
        r[:check.chunk_lengths[0]] = float("-inf")
        return r
    return s
P.score = score
parts = eng.parts
agg = {}
for ex in ds.examples[:limit]:
    chunks = list(ex.chunks if ex.chunks is not None else retr(ex.question, 5))
    layout, _ = fit_to_context(eng, ex, chunks, 4)
    if ex.chunks is None:
        layout = Layout(layout.prefix, layout.chunks[::-1], layout.suffix)
    ckv = eng.memory_cache(layout).fetch(layout.chunks)
    full = prefill_full(eng.model, layout)
    pre = eng.prefix_kv(layout.prefix)
    rec = {"id": ex.id, "reuse": kl_first_token(full.logits, prefill_cached(parts, layout, pre, ckv, "reuse").logits)}
    for m in ("token", "chunk", "nearest"):
        mode["m"] = m
        for r in ratios:
            res = prefill_cached(parts, layout, pre, ckv, "blend", BlendConfig(ratio=r, check_layer=1, selection="lookahead"))
            rec[f"{m}@{r}"] = kl_first_token(full.logits, res.logits)
    for k, v in rec.items():
        if k != "id": agg.setdefault(k, []).append(v)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
m = {k: sum(v) / len(v) for k, v in agg.items()}
print("MEAN", json.dumps({k: f"{v:.4f} ({v / m['reuse']:.2f}x)" for k, v in m.items()}))
