"""KL(full || blend) against r for several selections incl. oracles, per example (issue 21)."""
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

model, data, ddir, limit, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ratios = [0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6]
eng = load_engine(model, "cpu", "float32")
ds, retr = _dataset(data, None if ddir == '-' else Path(ddir), 90, limit)
orig_score = P.score
forced = {}
def score(sel, check):
    if "v" in forced:
        return forced["v"].clone()
    return orig_score(sel, check)
P.score = score
rows = []
for ex in ds.examples[:limit]:
    chunks = list(ex.chunks if ex.chunks is not None else retr(ex.question, 5))
    layout, _ = fit_to_context(eng, ex, chunks, 4)
    if ex.chunks is None:
        layout = Layout(layout.prefix, layout.chunks[::-1], layout.suffix)
    ckv = eng.memory_cache(layout).fetch(layout.chunks)
    full = prefill_full(eng.model, layout)
    pre = eng.prefix_kv(layout.prefix)
    stale = fill_cache(eng.parts, layout, pre, ckv)
    Pn, S = layout.n_prefix, layout.suffix_start
    n1 = len(layout.chunks[0])
    d = (stale[:, :, :, Pn:S] - full.kv[:, :, :, Pn:S]).float().square()
    fullnorm = full.kv[:, :, :, Pn:S].float().square().sum(dim=(2, 4)).mean(-1)  # [L,2]
    # oracle scores: true value / key deviation summed over all layers (each layer normalized)
    orv = (d[:, 1].sum(dim=(1, 3)) / fullnorm[:, 1:2]).sum(0)
    ork = (d[:, 0].sum(dim=(1, 3)) / fullnorm[:, 0:1]).sum(0)
    orkv = orv + ork
    for o in (orv, ork, orkv):
        o[:n1] = float("-inf")
    rec = {"id": ex.id, "chunks": [len(c) for c in layout.chunks], "reuse": kl_first_token(
        full.logits, prefill_cached(eng.parts, layout, pre, ckv, "reuse").logits)}
    for name, vec in [("lookahead", None), ("value", None), ("oracle_v", orv), ("oracle_kv", orkv)]:
        for r in ratios:
            if vec is None:
                forced.pop("v", None)
            else:
                forced["v"] = vec
            sel = name if vec is None else "value"
            res = prefill_cached(eng.parts, layout, pre, ckv, "blend", BlendConfig(ratio=r, check_layer=1, selection=sel))
            rec[f"{name}@{r}"] = kl_first_token(full.logits, res.logits)
    forced.pop("v", None)
    rows.append(rec)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
Path(out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
mean = lambda k: sum(r[k] for r in rows) / len(rows)
print("reuse", round(mean("reuse"), 4))
for name in ("lookahead", "value", "oracle_v", "oracle_kv"):
    print(name, " ".join(f"{r}:{mean(f'{name}@{r}'):.4f}({mean(f'{name}@{r}')/mean('reuse'):.2f}x)" for r in ratios))
