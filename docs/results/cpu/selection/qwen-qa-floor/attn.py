"""Where the question looks (issue 21): the last prompt token's attention mass per prompt segment,
averaged over heads, per layer band, under full's cache and under blend's (the suffix re-run by
transformers' eager attention over the cache each prefill leaves; its logits must match)."""
import sys, json
from pathlib import Path
import torch
torch.set_num_threads(1)
from transformers import DynamicCache
from api.cli_common import load_engine
from api.cli_eval import _dataset
from eval.layouts import fit_to_context
from blend.prompt import Layout
from blend.prefill import prefill_full, prefill_cached
from blend.spec import BlendConfig
from eval.metrics import kl_first_token

model, data, ddir, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
eng = load_engine(model, "cpu", "float32")
eng.model.set_attn_implementation("eager")
ds, retr = _dataset(data, None if ddir == '-' else Path(ddir), 90, None)
parts = eng.parts
for ex in ds.examples:
    if ex.id not in ids:
        continue
    chunks = list(ex.chunks if ex.chunks is not None else retr(ex.question, 5))
    layout, _ = fit_to_context(eng, ex, chunks, 4)
    if ex.chunks is None:
        layout = Layout(layout.prefix, layout.chunks[::-1], layout.suffix)
    ckv = eng.memory_cache(layout).fetch(layout.chunks)
    full = prefill_full(eng.model, layout)
    pre = eng.prefix_kv(layout.prefix)
    Pn, S = layout.n_prefix, layout.suffix_start
    bounds = [(0, Pn)] + [(s, s + len(c)) for s, c in zip(layout.chunk_starts, layout.chunks)] + [(S, layout.n_tokens)]
    names = ["prefix"] + [f"c{j+1}" for j in range(len(layout.chunks))] + ["question"]
    variants = {"full": full, "reuse": prefill_cached(parts, layout, pre, ckv, "reuse")}
    for r in (0.15, 0.3, 0.6):
        variants[f"la@{r}"] = prefill_cached(parts, layout, pre, ckv, "blend", BlendConfig(ratio=r, check_layer=1, selection="lookahead"))
    print(f"== {ex.id} segments {names} lens {[b - a for a, b in bounds]}")
    L = parts.n_layers
    for name, res in variants.items():
        cache = DynamicCache()
        for i in range(L):
            cache.update(res.kv[i, 0, :, :S][None].clone(), res.kv[i, 1, :, :S][None].clone(), i)
        with torch.inference_mode():
            out = eng.model(input_ids=torch.tensor([layout.suffix]), past_key_values=cache, output_attentions=True,
                            position_ids=torch.arange(S, layout.n_tokens)[None])
        logits = out.logits[0, -1].float()
        a = torch.stack([att[0, :, -1] for att in out.attentions]).mean(1)  # [L, N] last query, head mean
        seg = torch.stack([a[:, lo:hi].sum(-1) for lo, hi in bounds], dim=1)  # [L, segs]
        bands = {"L0-7": seg[:8].mean(0), "L8-15": seg[8:16].mean(0), "L16-23": seg[16:].mean(0)}
        kl = kl_first_token(full.logits, res.logits)
        print(f"  {name:8s} KL {kl:.4f} (re-run KL vs own {kl_first_token(res.logits, logits):.1e}) " +
              " | ".join(f"{b}: " + " ".join(f"{v:.3f}" for v in vals.tolist()) for b, vals in bands.items()))
