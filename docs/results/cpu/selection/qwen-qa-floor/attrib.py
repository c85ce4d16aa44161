"""Which recomputed tokens remove the KL: forced selections (issue 21)."""
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

model, data, ddir, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
eng = load_engine(model, "cpu", "float32")
ds, retr = _dataset(data, None if ddir == '-' else Path(ddir), 90, None)
forced = {}
P.score = lambda sel, check: forced["v"].clone()
tok = eng.tokenizer
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
    C = layout.n_chunk_tokens
    lens = [len(c) for c in layout.chunks]
    offs = [sum(lens[:j]) for j in range(len(lens))]
    def kl_of(mask):  # mask [C] bool: recompute these chunk tokens
        mask = torch.as_tensor(mask)
        n = int(mask.sum())
        if n == 0:
            res = prefill_cached(eng.parts, layout, pre, ckv, "reuse")
        else:
            s = torch.full((C,), float("-inf")); s[mask] = 1.0
            forced["v"] = s
            res = prefill_cached(eng.parts, layout, pre, ckv, "blend", BlendConfig(ratio=n / C, check_layer=1, selection="value"))
        return kl_first_token(full.logits, res.logits)
    base = torch.zeros(C, dtype=torch.bool); base[lens[0]:] = True
    print(f"== {ex.id} chunks={lens} texts:", [tok.decode(c)[:40] for c in layout.chunks])
    print("  reuse", round(kl_of(torch.zeros(C, dtype=torch.bool)), 4), " all-but-1", round(kl_of(base), 5))
    for j in range(1, len(lens)):
        only = torch.zeros(C, dtype=torch.bool); only[offs[j]:offs[j] + lens[j]] = True
        print(f"  chunk{j+1}: only it recomputed {kl_of(only):.4f}   all but it {kl_of(base & ~only):.4f}")
    # token classes
    last = torch.zeros(C, dtype=torch.bool)
    firsts = torch.zeros(C, dtype=torch.bool)
    for j in range(1, len(lens)):
        last[offs[j] + lens[j] - 1] = True
        firsts[offs[j]] = True
    print(f"  all-but-1 minus each chunk's last token (\\n\\n): {kl_of(base & ~last):.4f}; only those: {kl_of(last):.4f}")
    print(f"  all-but-1 minus each chunk's first token: {kl_of(base & ~firsts):.4f}; only those: {kl_of(firsts):.4f}")
    # first / second half of the eligible region
    pos = torch.arange(C)
    mid = (lens[0] + C) // 2
    print(f"  first half of eligible only {kl_of(base & (pos < mid)):.4f}; second half only {kl_of(base & (pos >= mid)):.4f}")
