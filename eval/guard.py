"""Does the quality guard's estimate track the real distance to `full`, and what does a guard buy?

Pass 1 scores blend at `ratio` with the guard watching but never acting (an infinite bound, so
every example records its estimate), and fixed ratios beside it. The bound is then calibrated on
the first half of the examples (the `quantile` of their estimates) and pass 2 runs blend with that
guard; the report compares it with the fixed ratios on the second half, which the bound never saw.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blend.engine import Engine

from eval.examples import Dataset
from eval.runner import FULL, Retriever, Variant, run, run_config

WATCH = 1e30  # a bound no estimate reaches: the guard reports but never raises the ratio


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _rows(records: list[dict], **match) -> list[dict]:
    out = []
    for rec in records:
        row = next(r for r in rec["results"] if all(r.get(k) == v for k, v in match.items()))
        out.append(row)
    return out


def run_guard_study(engine: Engine, dataset: Dataset, out_dir: str | Path, *, ratio: float = 0.15,
                    selection: str, fixed: Sequence[float] = (0.15, 0.3), quantile: float = 0.5,
                    max_tokens: int = 16, limit: int | None = None, retriever: Retriever | None = None,
                    progress: bool = True) -> dict:
    out = Path(out_dir)
    c = 1
    fixed = sorted(set(fixed) | {ratio})
    watch = Variant("blend", ratio, c, selection, WATCH)
    variants = [FULL] + [Variant("blend", r, c, selection) for r in fixed] + [watch]
    config = run_config(engine, dataset, variants, max_tokens=max_tokens, seed=0, top_k=5)
    records = run(engine, dataset, config, out / "watch", limit=limit, retriever=retriever, progress=progress)
    watched = _rows(records, mode="blend", ratio=ratio, guard=WATCH)
    est = [r["guard_estimate"] for r in watched]
    kl = [r["kl_vs_full"] for r in watched]
    half = len(records) // 2
    if half < 2:
        raise ValueError("the guard study needs at least 4 examples (half calibrate, half test)")
    bound = float(np.quantile(est[:half], quantile))
    guarded = Variant("blend", ratio, c, selection, bound)
    config2 = run_config(engine, dataset, [FULL, guarded], max_tokens=max_tokens, seed=0, top_k=5)
    records2 = run(engine, dataset, config2, out / "guarded", limit=limit, retriever=retriever, progress=progress)
    test = slice(half, None)

    def summary(rows: list[dict]) -> dict:
        return {"kl_vs_full": float(np.mean([r["kl_vs_full"] for r in rows])),
                "agree_with_full": float(np.mean([r["agree_with_full"] for r in rows])),
                "recompute_fraction": float(np.mean([r["recompute_fraction"] for r in rows]))}

    report = {
        "dataset": dataset.name, "n": len(records), "calibration": half, "test_n": len(records) - half,
        "selection": selection, "ratio": ratio, "quantile": quantile, "bound": bound,
        "spearman_estimate_vs_kl": rank_correlation(est, kl),
        "spearman_on_test_half": rank_correlation(est[test], kl[test]),
        "test": {f"blend r={r:g}": summary(_rows(records, mode="blend", ratio=r, guard=None)[test]) for r in fixed}
        | {f"blend r={ratio:g} guard={bound:.3g}": summary(_rows(records2, mode="blend", guard=bound)[test])},
        "raised": int(sum(r["ratio_used"] > ratio for r in _rows(records2, mode="blend", guard=bound)[test])),
        "per_example": [{"id": rec["id"], "estimate": e, "kl_vs_full": k} for rec, e, k in zip(records, est, kl)],
    }
    (out / "guard.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "guard.md").write_text(markdown(report), encoding="utf-8")
    return report


def markdown(rep: dict) -> str:
    lines = [f"# quality guard: {rep['dataset']}, {rep['selection']}, r = {rep['ratio']:g}", "",
             f"Spearman rank correlation of the estimate with the first-token KL to full: "
             f"{rep['spearman_estimate_vs_kl']:.3f} over {rep['n']} examples "
             f"({rep['spearman_on_test_half']:.3f} on the test half).", "",
             f"Bound: the {rep['quantile']:g} quantile of the estimates on the first {rep['calibration']} "
             f"examples = {rep['bound']:.4g}. On the other {rep['test_n']} (the guard raised the ratio for "
             f"{rep['raised']}):", "",
             "| variant | mean recompute share | mean KL vs full | agree w/ full |", "|---|---:|---:|---:|"]
    for name, s in rep["test"].items():
        lines.append(f"| {name} | {s['recompute_fraction']:.3f} | {s['kl_vs_full']:.4f} | {s['agree_with_full']:.2f} |")
    return "\n".join(lines) + "\n"
