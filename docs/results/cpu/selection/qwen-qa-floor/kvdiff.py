"""Diagnostics for issue 21: where blend's cache differs from full's on Qwen qa."""
import sys, json, math
import torch
torch.set_num_threads(1)
from api.cli_common import load_engine
from api.cli_eval import _retriever
from eval.layouts import fit_to_context
from blend.prompt import Layout
from blend.prefill import prefill_full, prefill_cached, fill_cache
from blend.spec import BlendConfig
from eval.metrics import kl_first_token
import blend.prefill as P
from pathlib import Path

model = sys.argv[1]; data = sys.argv[2]; ddir = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != '-' else None
limit = int(sys.argv[4]) if len(sys.argv) > 4 else 3
eng = load_engine(model, "cpu", "float32")
from api.cli_eval import _dataset
ds, retr = _dataset(data, Path(ddir) if ddir else None, 90, limit)
for ex in ds.examples[:limit]:
    chunks = list(ex.chunks if ex.chunks is not None else retr(ex.question, 5))
    layout, _ = fit_to_context(eng, ex, chunks, 4)
    if ex.chunks is None:
        layout = Layout(layout.prefix, layout.chunks[::-1], layout.suffix)
    cache = eng.memory_cache(layout)
    ckv = cache.fetch(layout.chunks)
    full = prefill_full(eng.model, layout)
    pre = eng.prefix_kv(layout.prefix)
    stale = fill_cache(eng.parts, layout, pre, ckv)
    Pn, S = layout.n_prefix, layout.suffix_start
    fk = full.kv[:, :, :, :S]
    d = (stale[:, :, :, :S] - fk).float()
    # per position, relative deviation of values and keys summed over layers
    devv = d[:, 1].square().sum(dim=(1, 3)) / fk[:, 1].float().square().sum(dim=(1, 3)).mean(dim=1, keepdim=True)
    devk = d[:, 0].square().sum(dim=(1, 3)) / fk[:, 0].float().square().sum(dim=(1, 3)).mean(dim=1, keepdim=True)
    print(f"== {ex.id} P={Pn} chunks={[len(c) for c in layout.chunks]} suffix={len(layout.suffix)}")
    print("  prefix max|d| per layer:", float(d[:, :, :, :Pn].abs().max()))
    c0 = layout.chunk_starts[0]; c1 = c0 + len(layout.chunks[0])
    print("  chunk1 max|d|:", float(d[:, :, :, c0:c1].abs().max()), " chunk1 rel dev max (V, K):",
          float(devv[:, c0:c1].max()), float(devk[:, c0:c1].max()))
    toks = layout.ids()
    for j, (st, ids) in enumerate(zip(layout.chunk_starts, layout.chunks)):
        vv = devv[:, st:st+len(ids)].mean(0)
        top = torch.topk(vv, 3)
        print(f"  chunk{j+1} mean relV={float(vv.mean()):.3f}  top: " +
              ", ".join(f"{int(i)}:{eng.tokenizer.decode([toks[st+int(i)]])!r}={float(v):.2f}" for v, i in zip(top.values, top.indices)))
    # logits: reuse and blends
    kls = {}
    for mode, cfg in [("reuse", None)] + [("blend", BlendConfig(ratio=r, check_layer=1, selection="lookahead")) for r in (0.15, 0.3, 0.6, 0.9, 1.0)]:
        res = prefill_cached(eng.parts, layout, pre, ckv, mode, cfg)
        kls[f"{mode}{'' if cfg is None else cfg.ratio}"] = kl_first_token(full.logits, res.logits)
    # all but the first chunk recomputed (oracle: test chunk 1 exactness)
    C = layout.n_chunk_tokens; n1 = len(layout.chunks[0])
    res = prefill_cached(eng.parts, layout, pre, ckv, "blend", BlendConfig(ratio=(C - n1) / C, check_layer=1, selection="lookahead"))
    kls["allbut1"] = kl_first_token(full.logits, res.logits)
    kls["allbut1_recomp"] = res.recomputed_tokens
    print("  KL:", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in kls.items()})
