"""What a run leaves in its directory: `results.json` (config, per-example rows, a summary per
mode × ratio), `results.md` (the summary as a table) and `plot.png` (quality and KL against TTFT,
in the style of the CacheBlend paper's figures)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.metrics import LOOP_NGRAM

MEANS = ("f1", "rougeL", "contains_answer", "loops", "kl_vs_full", "agree_with_full", "lead_with_full",
         "first4_with_full", "rougeL_vs_full", "recompute_fraction", "neighbour_entries")
_KEY = ("mode", "ratio", "check_layer", "selection", "later_checks", "neighbours")
INTERVALS = ("f1", "rougeL", "contains_answer", "agree_with_full")  # with a bootstrap interval
BOOTSTRAP_RESAMPLES = 1000
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled)"  # what the engine calls "default"


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float]:
    """The 95% percentile-bootstrap interval of the mean, resampling examples."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def model_label(config: dict) -> str:
    return BUNDLED_NAME if config.get("model") == "default" else str(config.get("model"))


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def summarize(records: Sequence[dict]) -> list[dict]:
    """One row per variant, in run order: TTFT median and p90, speedup over full's median, means."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        for row in rec["results"]:
            groups.setdefault(tuple(_hashable(row.get(k)) for k in _KEY), []).append(row)
    out = []
    for key, rows in groups.items():
        ttft = np.array([r["ttft_ms"] for r in rows])
        out.append(dict(zip(_KEY, (list(k) if isinstance(k, tuple) else k for k in key)), n=len(rows), ttft_ms_median=float(np.median(ttft)),
                        ttft_ms_p90=float(np.percentile(ttft, 90)),
                        **{m: _mean(rows, m) for m in MEANS},
                        **{f"{m}_ci": bootstrap_ci([r[m] for r in rows if r.get(m) is not None])
                           for m in INTERVALS if any(r.get(m) is not None for r in rows)}))
    full = next((r["ttft_ms_median"] for r in out if r["mode"] == "full"), None)
    for r in out:
        r["speedup_vs_full"] = full / r["ttft_ms_median"] if full and r["ttft_ms_median"] > 0 else None
    return out


def _mean(rows: Sequence[dict], metric: str) -> float | None:
    """The mean over the rows that have the metric (results from before it existed lack it)."""
    values = [r[metric] for r in rows if r.get(metric) is not None]
    return float(np.mean(values)) if values else None


def label(row: dict, with_blend_config: bool = False) -> str:
    if row["mode"] != "blend":
        return row["mode"]
    text = f"blend r={row['ratio']:g}"
    return text + f" c={checks_label(row)} {row['selection']}" if with_blend_config else text


def checks_label(row: dict) -> str:
    """"1", or "1,8" for gradual filtering."""
    return ",".join(str(c) for c in [row["check_layer"], *(row.get("later_checks") or [])])


def write_results(out_dir: str | Path, config: dict, records: Sequence[dict], summary: Sequence[dict]) -> None:
    out_dir = Path(out_dir)
    doc = {"config": config, "examples": list(records), "summary": list(summary)}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown(config, summary), encoding="utf-8")
    plot(out_dir / "plot.png", config, summary)


def fmt(value, spec: str) -> str:
    """`spec` may end in a unit after the format spec: ".2f×"."""
    if value is None:
        return "—"
    unit = spec.lstrip(".0123456789")[1:]
    return format(value, spec.removesuffix(unit)) + unit


def _neighbour_kv(config: dict) -> str:
    rules = sorted({v["neighbours"] for v in config.get("variants", []) if v.get("neighbours")})
    if not config.get("neighbours") or not rules:
        return " · plain chunk KV"
    return f" · reuse and blend over neighbour-aware chunk KV (N = {config['neighbours']}, {', '.join(rules)})"


def markdown(config: dict, summary: Sequence[dict]) -> str:
    n = max((r["n"] for r in summary), default=0)
    lines = [f"# ragblend eval: {config['dataset']}", "",
             f"{n} examples · model `{model_label(config)}` · {config['device']} {config['dtype']} · "
             f"max {config['max_tokens']} tokens · greedy{_penalties(config)} · seed {config['seed']}"
             f"{_neighbour_kv(config)}", "",
             "| mode | ratio | n | TTFT median ms | TTFT p90 ms | speedup | F1 | ROUGE-L | contains answer | loops | "
             "KL vs full | agree w/ full | leading tokens = full | first 4 = full | ROUGE-L vs full | recompute |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(" | ".join([
            f"| {r['mode']}" + ("" if not r.get("later_checks") else f" (checks {checks_label(r)})"),
            fmt(r["ratio"], "g"), str(r["n"]), fmt(r["ttft_ms_median"], ".1f"),
            fmt(r["ttft_ms_p90"], ".1f"), fmt(r["speedup_vs_full"], ".2f×"), fmt(r["f1"], ".3f"),
            fmt(r["rougeL"], ".3f"), fmt(r.get("contains_answer"), ".2f"), fmt(r.get("loops"), ".2f"),
            fmt(r["kl_vs_full"], ".2e"), fmt(r["agree_with_full"], ".2f"),
            fmt(r["lead_with_full"], ".1f"), fmt(r["first4_with_full"], ".2f"),
            fmt(r["rougeL_vs_full"], ".3f"), fmt(r["recompute_fraction"], ".3f")]) + " |")
    lines += ["", "Contains answer: share of answers holding an accepted answer (normalized, whole words). "
              f"Loops: share of answers in which a run of {LOOP_NGRAM} words occurs twice. "
              "KL vs full: KL(full ‖ mode) of the first output token, nats. Agreement, leading tokens "
              "(mean count of the answer's first tokens equal to full's), first 4 (share of answers whose "
              "first 4 tokens are full's) and ROUGE-L vs full compare greedy token ids. Recompute: chunk tokens whose KV is recomputed / all chunk "
              "tokens. TTFT excludes chunk KV precompute (as when served from the store).", ""]
    return "\n".join(lines)


def _penalties(config: dict) -> str:
    pen = config.get("penalties") or {}
    return "".join(f", {k.removesuffix('_penalty')} penalty {v:g}" for k, v in pen.items())


_KL_NOISE = 1e-10
_COLORS = {"full": "black", "prefix": "tab:orange", "reuse": "tab:red", "blend": "tab:blue"}
_MARKERS = {"full": "s", "prefix": "^", "reuse": "v", "blend": "o"}


def plot(path: str | Path, config: dict, summary: Sequence[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = config.get("metric", "f1")
    kls = [r["kl_vs_full"] for r in summary if r["kl_vs_full"] > 0]
    # Log scale has no zero, and KLs below ~1e-10 are float32 rounding of equal logits: full's own
    # 0 and anything that small sit on a floor line, labelled as such.
    floor = max(_KL_NOISE, 10 ** math.floor(math.log10(min(kls))) / 10) if kls else _KL_NOISE
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = ((metric, "F1" if metric == "f1" else "ROUGE-L", "quality vs answers"),
              ("kl_vs_full", "KL(full ‖ mode), first token [nats]", "distance to full"),
              ("agree_with_full", "share of answers equal to full's", "agreement with full"))
    for ax, (key, ylabel, title) in zip(axes, panels):
        ys = {id(r): max(r[key], floor) if key == "kl_vs_full" else r[key] for r in summary}
        blend = sorted((r for r in summary if r["mode"] == "blend"), key=lambda r: r["ratio"])
        if blend:
            ax.plot([r["ttft_ms_median"] for r in blend], [ys[id(r)] for r in blend], "-",
                    color=_COLORS["blend"], alpha=0.6, zorder=1)
        points = []
        for r in summary:
            x, y = r["ttft_ms_median"], ys[id(r)]
            ax.scatter([x], [y], color=_COLORS[r["mode"]], marker=_MARKERS[r["mode"]], s=55, zorder=2)
            if f"{key}_ci" in r:  # 95% bootstrap interval over the examples
                lo, hi = r[f"{key}_ci"]
                ax.errorbar([x], [y], yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], color=_COLORS[r["mode"]],
                            capsize=3, lw=1, zorder=1)
            text = label(r)
            if key == "kl_vs_full" and r["kl_vs_full"] <= floor:
                text += " (0)" if r["kl_vs_full"] == 0 else f" (≤{floor:.0e})"
            points.append((x, y, text))
        if key == "kl_vs_full":
            ax.set_yscale("log")
            ax.axhline(floor, color="grey", lw=0.6, ls=":")
        else:
            ax.set_ylim(-0.05, 1.05)
        ax.margins(x=0.15)
        _annotate(ax, points)
        ax.set_xlabel("TTFT median [ms]")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    n = max((r["n"] for r in summary), default=0)
    fig.suptitle(f"{config['dataset']} · {n} examples · model {model_label(config)} · {config['device']} "
                 f"{config['dtype']} · bars: 95% bootstrap intervals over examples", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _annotate(ax, points: list[tuple[float, float, str]]) -> None:
    """Label each point; a label whose point lands within a few pixels of an already labelled one
    (full and blend r=1 often coincide) is stacked below the earlier labels instead of over them."""
    ax.autoscale_view()
    placed: list[tuple[float, float]] = []
    for x, y, text in points:
        px, py = ax.transData.transform((x, y))
        clash = sum(abs(px - qx) < 90 and abs(py - qy) < 12 for qx, qy in placed)
        placed.append((px, py))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 5 - 11 * clash), fontsize=8)
