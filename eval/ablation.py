"""Which check layer and which deviation (value or key) should `blend` default to, and by how much:
blend at one ratio for every pair, each scored against `full` on the same examples."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from blend.engine import Engine

from eval.datasets import Dataset
from eval.report import fmt, summarize
from eval.runner import FULL, Retriever, Variant, run, run_config

CHECK_LAYERS = (0, 1, 2, 4)
DEVIATIONS = ("value", "key")
DEFAULT = (1, "value")  # BlendConfig's defaults, the row every other is compared with


def ablation_variants(ratio: float = 0.15, check_layers: Sequence[int] = CHECK_LAYERS,
                      deviations: Sequence[str] = DEVIATIONS) -> list[Variant]:
    return [FULL] + [Variant("blend", ratio, c, d) for c in check_layers for d in deviations]


def run_ablation(engine: Engine, dataset: Dataset, out_dir: str | Path, *, ratio: float = 0.15,
                 check_layers: Sequence[int] = CHECK_LAYERS, deviations: Sequence[str] = DEVIATIONS,
                 max_tokens: int = 32, seed: int = 0, limit: int | None = None,
                 retriever: Retriever | None = None, fresh: bool = False, progress: bool = True) -> list[dict]:
    """Runs (resumably, like `eval`) and writes `ablation.json` and `ablation.md`; returns the rows.
    Check layers the model does not have are left out."""
    layers = [c for c in check_layers if c < engine.parts.n_layers]
    if not layers:
        raise ValueError(f"no check layer below the model's {engine.parts.n_layers} layers")
    variants = ablation_variants(ratio, layers, deviations)
    config = run_config(engine, dataset, variants, max_tokens=max_tokens, seed=seed, top_k=5)
    records = run(engine, dataset, config, out_dir, limit=limit, retriever=retriever, fresh=fresh,
                  progress=progress)
    rows = summarize(records)
    out = Path(out_dir)
    doc = {"config": config, "examples": records, "summary": rows}
    (out / "ablation.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(markdown(config, rows), encoding="utf-8")
    return rows


def markdown(config: dict, rows: Sequence[dict]) -> str:
    metric = config["metric"]
    blend = [r for r in rows if r["mode"] == "blend"]
    n = max((r["n"] for r in rows), default=0)
    ratio = blend[0]["ratio"] if blend else None
    lines = [f"# blend ablation: {config['dataset']}, r = {ratio:g}" if blend else "# blend ablation", "",
             f"{n} examples · model `{config['model']}` · max {config['max_tokens']} tokens · greedy", "",
             f"| check layer | deviation | KL vs full | agree w/ full | {metric} | TTFT median ms | speedup |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in blend:
        mark = " (default)" if (r["check_layer"], r["deviation"]) == DEFAULT else ""
        lines.append(f"| {r['check_layer']} | {r['deviation']}{mark} | {fmt(r['kl_vs_full'], '.3e')} | "
                     f"{fmt(r['agree_with_full'], '.2f')} | {fmt(r[metric], '.3f')} | "
                     f"{fmt(r['ttft_ms_median'], '.1f')} | {fmt(r['speedup_vs_full'], '.2f×')} |")
    full = next((r for r in rows if r["mode"] == "full"), None)
    if full:
        lines += ["", f"full: {metric} {full[metric]:.3f}, TTFT median {full['ttft_ms_median']:.1f} ms."]
    default = next((r for r in blend if (r["check_layer"], r["deviation"]) == DEFAULT), None)
    if blend:
        best = min(blend, key=lambda r: (r["kl_vs_full"], -r["agree_with_full"]))
        line = f"Closest to full (lowest KL): check layer {best['check_layer']}, {best['deviation']}"
        if default and best is not default and best["kl_vs_full"] > 0:
            line += (f": KL {default['kl_vs_full'] / best['kl_vs_full']:.2f}× lower than the default's, "
                     f"agreement {best['agree_with_full'] - default['agree_with_full']:+.2f}")
        elif best is default:
            line += " (the default)"
        lines += ["", line + "."]
    return "\n".join(lines) + "\n"
