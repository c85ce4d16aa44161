"""How should `blend` choose the tokens it recomputes? Every selection × ratio (× check layers) in
one run, each scored against `full` on the same examples and the same chunk KVs; a table and a plot
of KL and leading agreement against the ratio, one line per selection (and check-layer schedule)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from blend.engine import Engine
from blend.spec import DEFAULT_SELECTION, SELECTIONS

from eval.examples import Dataset
from eval.report import checks_label, fmt, summarize
from eval.runner import FULL, NeighbourCorpus, Retriever, Variant, run, run_config

RATIOS = (0.05, 0.15, 0.3)
CHECK_LAYERS = (1,)


def ablation_variants(ratios: Sequence[float] = RATIOS, selections: Sequence[str] = SELECTIONS,
                      check_layers: Sequence[int] = CHECK_LAYERS,
                      gradual: Sequence[tuple[int, ...]] = (), neighbour_rules: Sequence[str] = ()) -> list[Variant]:
    """full (the reference), reuse (the floor every selection must beat), then the grid: every
    single check layer, then every gradual schedule (several check layers); with neighbour rules,
    reuse and the grid again over neighbour-aware chunk KV, once per rule."""
    schedules = [(c,) for c in check_layers] + [tuple(g) for g in gradual]
    out = [FULL]
    for rule in (None, *neighbour_rules):
        out += [Variant("reuse", neighbours=rule)] + [Variant("blend", float(r), g[0], s, g[1:], rule)
                                                      for g in schedules for s in selections for r in ratios]
    return out


def run_ablation(engine: Engine, dataset: Dataset, out_dir: str | Path, *, ratios: Sequence[float] = RATIOS,
                 selections: Sequence[str] = SELECTIONS, check_layers: Sequence[int] = CHECK_LAYERS,
                 gradual: Sequence[tuple[int, ...]] = (), max_tokens: int = 32, seed: int = 0, limit: int | None = None,
                 retriever: Retriever | None = None, fresh: bool = False, progress: bool = True,
                 neighbours: int = 0, neighbour_rules: Sequence[str] = (),
                 corpus: NeighbourCorpus | None = None) -> list[dict]:
    """Runs (resumably, like `eval`) and writes `ablation.json`, `ablation.md` and `ablation.png`;
    returns the summary rows. Check layers the model does not have are left out."""
    layers = [c for c in check_layers if c < engine.parts.n_layers]
    gradual = [g for g in gradual if max(g) < engine.parts.n_layers]
    if not layers and not gradual:
        raise ValueError(f"no check layer below the model's {engine.parts.n_layers} layers")
    variants = ablation_variants(ratios, selections, layers, gradual, neighbour_rules if neighbours else ())
    config = run_config(engine, dataset, variants, max_tokens=max_tokens, seed=seed, top_k=5,
                        neighbours=neighbours if neighbour_rules else 0)
    records = run(engine, dataset, config, out_dir, limit=limit, retriever=retriever, fresh=fresh,
                  progress=progress, corpus=corpus)
    rows = summarize(records)
    out = Path(out_dir)
    doc = {"config": config, "examples": records, "summary": rows}
    (out / "ablation.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(markdown(config, rows), encoding="utf-8")
    plot(out / "ablation.png", config, rows)
    return rows


def markdown(config: dict, rows: Sequence[dict]) -> str:
    metric = config["metric"]
    blend = [r for r in rows if r["mode"] == "blend"]
    reuse = next((r for r in rows if r["mode"] == "reuse" and not r.get("neighbours")), None)
    n = max((r["n"] for r in rows), default=0)
    lines = [f"# blend selection ablation: {config['dataset']}", "",
             f"{n} examples · model `{config['model']}` · max {config['max_tokens']} tokens · greedy", "",
             f"| selection | check layers | neighbour KV | ratio | KL vs full | × reuse's KL | × value's KL | agree w/ full | "
             f"leading tokens = full | first 4 = full | ROUGE-L vs full | {metric} | TTFT median ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    # × value's: value deviation with a single check at the schedule's first layer, same ratio
    value = {(r["check_layer"], r["ratio"]): r["kl_vs_full"] for r in blend
             if r["selection"] == "value" and not r.get("later_checks") and not r.get("neighbours")}
    for r in blend:
        mark = " (default)" if r["selection"] == DEFAULT_SELECTION else ""
        base = value.get((r["check_layer"], r["ratio"]))
        lines.append(f"| {r['selection']}{mark} | {checks_label(r)} | {neighbours_label(r)} | {r['ratio']:g} | {fmt(r['kl_vs_full'], '.4f')} | "
                     f"{fmt(_ratio(r['kl_vs_full'], reuse and reuse['kl_vs_full']), '.2f')} | "
                     f"{fmt(_ratio(r['kl_vs_full'], base), '.2f')} | {fmt(r['agree_with_full'], '.2f')} | "
                     f"{fmt(r['lead_with_full'], '.2f')} | {fmt(r['first4_with_full'], '.2f')} | "
                     f"{fmt(r['rougeL_vs_full'], '.3f')} | {fmt(r[metric], '.3f')} | {fmt(r['ttft_ms_median'], '.1f')} |")
    if reuse:
        lines += ["", f"reuse: KL {reuse['kl_vs_full']:.4f}, agreement {reuse['agree_with_full']:.2f}, "
                      f"leading tokens {reuse['lead_with_full']:.2f}, first 4 {reuse['first4_with_full']:.2f}."]
    for r in rows:
        if r["mode"] == "reuse" and r.get("neighbours"):
            lines.append(f"reuse over neighbour KV ({r['neighbours']}): KL {r['kl_vs_full']:.4f}, first 4 "
                         f"{r['first4_with_full']:.2f}; chunks served a neighbour entry: {r['neighbour_entries']:.2f} a prompt.")
    for ratio in sorted({r["ratio"] for r in blend}):
        at = [r for r in blend if r["ratio"] == ratio]
        best = min(at, key=lambda r: (r["kl_vs_full"], -r["agree_with_full"]))
        lines.append(f"r = {ratio:g}: lowest KL with {best['selection']} (check layers {checks_label(best)}).")
    return "\n".join(lines) + "\n"


def neighbours_label(row: dict) -> str:
    """The neighbour rule a row's chunk KV was served by, or — (plain entries)."""
    return row.get("neighbours") or "—"


def _ratio(a: float, b: float | None) -> float | None:
    return a / b if b else None


def plot(path: str | Path, config: dict, rows: Sequence[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blend = [r for r in rows if r["mode"] == "blend"]
    reuse = next((r for r in rows if r["mode"] == "reuse" and not r.get("neighbours")), None)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    schedules = {checks_label(r) for r in blend}
    for ax, key, ylabel in ((axes[0], "kl_vs_full", "KL(full ‖ blend), first token [nats]"),
                            (axes[1], "lead_with_full", "leading tokens equal to full's (mean)"),
                            (axes[2], "first4_with_full", "share with the first 4 tokens = full's")):
        for sel, c, nb in sorted({(r["selection"], checks_label(r), neighbours_label(r)) for r in blend}):
            line = sorted((r for r in blend if (r["selection"], checks_label(r), neighbours_label(r)) == (sel, c, nb)),
                          key=lambda r: r["ratio"])
            name = (sel if len(schedules) == 1 else f"{sel} c={c}") + ("" if nb == "—" else f" nb:{nb}")
            ax.plot([r["ratio"] for r in line], [r[key] for r in line], "o-",
                    lw=2.5 if sel == DEFAULT_SELECTION else 1.2, label=name)
        if reuse:
            ax.axhline(reuse[key], color="tab:red", ls="--", lw=1, label="reuse")
        ax.set_xlabel("recompute ratio r")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if key == "kl_vs_full":
            ax.set_yscale("log")
        elif key == "first4_with_full":
            ax.set_ylim(-0.05, 1.05)
        else:
            ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    n = max((r["n"] for r in rows), default=0)
    fig.suptitle(f"selection ablation · {config['dataset']} · {n} examples · {config['model']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
