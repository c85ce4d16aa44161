"""`ragblend bench`: TTFT of every prefill mode × ratio × KV tier on random weights of a real
shape, medians of repeated runs measured in one process, plus a context-length sweep.

TTFT here = fetch the chunk KVs from the tier + prefill + the first token on the host.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from blend.engine import UNBOUNDED, Engine, sync
from blend.loading import LoadingController, calibrate
from blend.loader import LoadedModel, fingerprint
from blend.prompt import Layout
from blend.sequence import Answer
from blend.shapes import random_layout, random_model  # noqa: F401  (random_layout: bench_serve's too)
from blend.spec import DEFAULT_CHECK_LAYER, DEFAULT_MAX_RATIO, DEFAULT_RATIO, DEFAULT_SELECTION, BlendConfig, Mode, QuerySpec
from store import KVStore
from store.quant import DEFAULT_FORMAT
from store.tiers import ChunkKVCache, ChunkKVSource


def timed_together(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                   runs: int) -> dict[str, dict]:
    """Median and p90 wall time (device synchronized) of several functions, run in turns (a, b,
    c, a, b, c, …), so that a drift of the machine (clocks, temperature, neighbours) falls on all
    of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"median_ms": statistics.median(ts), "p90_ms": ts[min(len(ts) - 1, int(0.9 * len(ts)))],
                     "runs": runs}
    return out


class Tiers:
    """The same chunk KVs behind each tier, as configurations of the cache the service uses: held
    in device memory, in pinned CPU memory, or in an LMDB store in each of `formats` (`lmdb:F`,
    streamed layer by layer on CUDA; `lmdb-whole:F`, read whole before the prefill)."""

    def __init__(self, engine: Engine, layout: Layout, tiers: Sequence[str], formats: Sequence[str], workdir: Path,
                 whole: bool = False):
        self.stores: list[KVStore] = []
        self.caches: dict[str, ChunkKVCache] = {}
        self.served: ChunkKVCache | None = None  # the headline row's cache (see below)
        self.served_keys: list[str] = []
        for tier in tiers:
            if tier == "gpu":
                self._add(tier, engine.kv_cache(layout.prefix, gpu_bytes=UNBOUNDED), layout)
            elif tier == "cpu":  # pinned host memory (on a CPU device, plain memory: the device tier)
                on_cpu = engine.device.type == "cpu"
                self._add(tier, engine.kv_cache(layout.prefix, gpu_bytes=UNBOUNDED if on_cpu else 0,
                                                cpu_bytes=UNBOUNDED), layout)
            else:
                for fmt in formats:
                    store = KVStore(workdir / f"kv-{fmt}.lmdb", map_size=1 << 32)
                    store.configure(kv_format=fmt)
                    self.stores.append(store)
                    self._add(f"lmdb:{fmt}", engine.kv_cache(layout.prefix, store=store, gpu_bytes=0, cpu_bytes=0),
                              layout)
                    if f"lmdb:{fmt}" == SERVED_TIER and whole:
                        # as `serve` holds it: a device tier that keeps what a request streamed
                        # (the stream then reads every layer, lands it and keeps it, on the
                        # request's path), emptied after each request (cool) so every run is cold
                        self.served = engine.kv_cache(layout.prefix, store=store, gpu_bytes=UNBOUNDED, cpu_bytes=0)
                        self.served_keys = [self.served.key(ids) for ids in layout.chunks]
                        self.cool()
                    if whole:
                        self._add(f"lmdb-whole:{fmt}", engine.kv_cache(layout.prefix, store=store, gpu_bytes=0,
                                                                       cpu_bytes=0, stream=False), layout)

    def cool(self) -> None:
        """The served cache's device tier forgets the layout's chunks (the store keeps them)."""
        for key in self.served_keys:
            self.served.gpu.pop(key)

    def _add(self, name: str, cache: ChunkKVCache, layout: Layout) -> None:
        for ids in layout.chunks:
            cache.ensure(ids)
        self.caches[name] = cache

    def close(self) -> None:
        for cache in [*self.caches.values(), *([self.served] if self.served is not None else [])]:
            cache.close()
        for store in self.stores:
            store.close()


def ttft(engine: Engine, layout: Layout, spec: QuerySpec, kv: ChunkKVSource) -> Answer:
    """The served path (engine.generate) to its first token, which is then on the host."""
    return engine.generate(layout, replace(spec, max_tokens=1), kv).run()


@dataclass(frozen=True)
class BenchConfig:
    shape: str = "tiny"
    device: str = "cuda"
    dtype: str = "bfloat16"
    n_chunks: int = 6
    chunk_tokens: int = 512
    question_tokens: int = 64
    ratios: tuple[float, ...] = (0.05, 0.15, 0.3)
    tiers: tuple[str, ...] = ("gpu", "cpu", "lmdb")
    kv_formats: tuple[str, ...] = (DEFAULT_FORMAT,)  # the LMDB tier in each of these stored formats
    warmup: int = 3
    runs: int = 10
    sweep: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    check_layer: int = DEFAULT_CHECK_LAYER
    selections: tuple[str, ...] = ()     # also time blend r=0.15 with each of these, in turns
    gradual: tuple[int, ...] = ()        # and each of them with these check layers (gradual filtering)
    profile_dir: Path | None = None
    model_spec: str | None = None        # a real model instead of random weights of `shape`

    def blend(self, ratio: float = DEFAULT_RATIO, selection: str = DEFAULT_SELECTION,
              checks: tuple[int, ...] = ()) -> QuerySpec:
        return QuerySpec(Mode.BLEND, BlendConfig.with_checks(checks or (self.check_layer,), ratio=ratio,
                                                             selection=selection))


# The configuration a default install serves: `ragblend index` stores DEFAULT_FORMAT in LMDB, and
# `serve` reads a request's chunks from there (streamed on CUDA) and blends them with QuerySpec's
# defaults. The bench's headline row is exactly this.
SERVED_TIER = f"lmdb:{DEFAULT_FORMAT}"


def served_spec(cfg: BenchConfig) -> QuerySpec:
    """What `serve` makes of a query that names no prefill settings: blend at the default ratio,
    which the loading controller may raise up to DEFAULT_MAX_RATIO while the KV streams."""
    return QuerySpec(Mode.BLEND, BlendConfig(check_layer=cfg.check_layer, max_ratio=DEFAULT_MAX_RATIO))


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Random weights of `cfg.shape`, or the real model `cfg.model_spec` (timing does not depend on
    the weights; the prompt is random token ids either way). Every cell of the grid is timed in
    turns (one run of each, then again), so a drift of the machine falls on all of them alike."""
    from blend.loader import load_model, parse_dtype
    if cfg.model_spec is not None:
        loaded = load_model(cfg.model_spec, device=cfg.device, dtype=cfg.dtype)
        model, shape = loaded.model, cfg.model_spec
        engine = Engine(loaded)
    else:
        model = random_model(cfg.shape, dtype=parse_dtype(cfg.dtype), device=cfg.device, seed=0)
        engine, shape = Engine(LoadedModel(model, None, f"random:{cfg.shape}", fingerprint(model))), cfg.shape
    dev, runs, warmup = engine.device, cfg.runs, cfg.warmup
    vocab = model.config.vocab_size
    layout = random_layout(vocab, cfg.n_chunks, cfg.chunk_tokens, cfg.question_tokens)
    out: dict = {"shape": shape, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                 "dtype": cfg.dtype, "n_chunks": cfg.n_chunks, "chunk_tokens": cfg.chunk_tokens,
                 "question_tokens": cfg.question_tokens, "prompt_tokens": layout.n_tokens,
                 "check_layer": cfg.check_layer, "selection": DEFAULT_SELECTION, "kv_formats": list(cfg.kv_formats),
                 "served": {"tier": SERVED_TIER, **served_spec(cfg).describe()},
                 "warmup": warmup, "runs": runs, "rows": [], "sweep": []}
    tiers = list(cfg.tiers)
    streams = "lmdb" in tiers and engine.graphs is not None  # else lmdb is read whole anyway
    if streams:  # as `serve` does: the controller's compute model, timed on this device
        engine.loading = LoadingController(calibrate(engine, cfg.n_chunks, cfg.chunk_tokens, cfg.question_tokens))
        out["loading_cost"] = asdict(engine.loading.cost)
        log(f"loading controller: {engine.loading.cost}")
    with tempfile.TemporaryDirectory() as tmp:
        store_tiers = Tiers(engine, layout, tiers, cfg.kv_formats, Path(tmp), whole=streams)
        caches = store_tiers.caches
        ids = torch.tensor([layout.ids()], device=dev)

        def hf_forward():
            with torch.inference_mode():
                return int(model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())

        first = next(iter(caches))
        cells: dict[str, tuple[dict, Callable[[], object]]] = {}

        used: dict[str, list[float]] = {}  # the ratio each blend cell's runs recomputed

        sources: dict[str, ChunkKVCache] = dict(caches)
        if store_tiers.served is not None:
            sources["served"] = store_tiers.served

        def cell(row: dict, spec: QuerySpec, source: str, eager: bool = False) -> None:
            key = f"{len(cells)}"

            def fn() -> None:
                graphs = engine.graphs
                if eager:
                    engine.graphs = None
                try:
                    answer = ttft(engine, layout, spec, sources[source])
                finally:
                    engine.graphs = graphs
                if source == "served":  # the next run is cold again
                    store_tiers.cool()
                if answer.ratio is not None:
                    used.setdefault(key, []).append(answer.ratio)
            cells[key] = (row, fn)

        cells["hf"] = ({"mode": "transformers", "ratio": None, "tier": None}, hf_forward)
        cell({"mode": "full", "ratio": None, "tier": None}, QuerySpec(Mode.FULL), first)
        if SERVED_TIER in caches:
            spec = served_spec(cfg)
            cell({"mode": "blend", "ratio": spec.blend.ratio, "tier": SERVED_TIER, "selection": spec.blend.selection,
                  "served_default": True, **({"kept": True} if "served" in sources else {})}, spec,
                 "served" if "served" in sources else SERVED_TIER)
        plans = [QuerySpec(Mode.PREFIX), QuerySpec(Mode.REUSE)] + [cfg.blend(r) for r in cfg.ratios]
        for tier in (t for t in caches if not t.startswith("lmdb-whole")):
            for spec in plans:
                cell({"mode": spec.mode.value, "ratio": spec.describe()["ratio"], "tier": tier}, spec, tier)
        for sel in cfg.selections:  # what each selector costs: blend r=0.15, KV on the first tier
            for g in [()] + ([cfg.gradual] if cfg.gradual else []):
                cell({"mode": "blend", "ratio": DEFAULT_RATIO, "tier": first, "selection": sel,
                      **({"check_layers": ",".join(map(str, g))} if g else {})}, cfg.blend(selection=sel, checks=g), first)
        for tier in (t for t in caches if t.startswith("lmdb-whole")):  # what streaming the layers buys
            for spec in (QuerySpec(Mode.REUSE), cfg.blend()):
                cell({"mode": spec.mode.value, "ratio": spec.describe()["ratio"], "tier": tier.replace("-whole", ""),
                      "unstreamed": True}, spec, tier)
        if engine.graphs is not None:  # the same path without CUDA graphs, to show what they buy
            for spec in (QuerySpec(Mode.REUSE), cfg.blend()):
                cell({"mode": spec.mode.value, "ratio": spec.describe()["ratio"], "tier": first, "eager": True},
                     spec, first, eager=True)
        stats = timed_together({k: fn for k, (_, fn) in cells.items()}, dev, warmup, runs)
        out["transformers_forward"] = stats.pop("hf")
        log(f"transformers forward: {out['transformers_forward']['median_ms']:.2f} ms")
        rows = [{**cells[k][0], **st, **({"ratio_used": statistics.median(used[k])} if k in used else {})}
                for k, st in stats.items()]
        full = next(r for r in rows if r["mode"] == "full")
        for row in rows:
            row["speedup_vs_full"] = full["median_ms"] / row["median_ms"]
            row["share_of_full"] = row["median_ms"] / full["median_ms"]
            log(f"{row['mode']:>7} r={row['ratio']!s:>5} tier={row['tier']!s:>13}{_variant(row)}: "
                f"median {row['median_ms']:8.2f} ms  p90 {row['p90_ms']:8.2f}  {row['share_of_full']:.2f}x full")
        out["rows"] = rows
        if cfg.profile_dir is not None and dev.type == "cuda":
            out["profile"] = profile(engine, layout, cfg, sources, list(sources), cfg.profile_dir, log, store_tiers.cool)
        store_tiers.close()
    for n in cfg.sweep:
        n_ch = max(1, (n - cfg.question_tokens - 32) // cfg.chunk_tokens)
        lay = random_layout(vocab, n_ch, cfg.chunk_tokens, cfg.question_tokens, seed=n)
        if lay.n_tokens > engine.max_context:
            continue
        mem = engine.memory_cache(lay)
        both = timed_together({"full": lambda: ttft(engine, lay, QuerySpec(Mode.FULL), mem),
                               "blend": lambda: ttft(engine, lay, cfg.blend(), mem)}, dev, 1, max(3, runs // 2))
        f, b = both["full"], both["blend"]
        out["sweep"].append({"tokens": lay.n_tokens, "full_ms": f["median_ms"], "blend_ms": b["median_ms"],
                             "speedup": f["median_ms"] / b["median_ms"]})
        log(f"sweep {lay.n_tokens:6d} tokens: full {f['median_ms']:8.2f} ms  blend r=0.15 {b['median_ms']:8.2f} ms  "
            f"speedup {f['median_ms'] / b['median_ms']:.2f}x")
    return out


def profile(engine: Engine, layout: Layout, cfg: BenchConfig, caches: dict[str, ChunkKVCache],
            tier_names: Sequence[str], out_dir: Path, log: Callable[[str], None],
            cool: Callable[[], None] = lambda: None) -> dict:
    """Where a request's time goes: stage wall times (synchronized) and the top CUDA kernels. The
    `served` source is profiled as the headline row runs (served_spec, cooled after each run)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out_dir.mkdir(parents=True, exist_ok=True)
    stages: dict = {}
    for tier in tier_names:
        specs = (served_spec(cfg),) if tier == "served" else (QuerySpec(Mode.REUSE), cfg.blend())
        for spec in specs:
            src = caches[tier]
            ttft(engine, layout, spec, src)
            cool()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ttft(engine, layout, spec, src)
            cool()
            ratio = spec.describe()["ratio"]
            name = f"{spec.mode.value}{'' if ratio is None else f'-{ratio}'}-{tier.replace(':', '-')}"
            ranges = {e.key: round(e.device_time_total / 1e3, 3) for e in prof.key_averages()
                      if e.key.startswith("rb.")}
            ranges.update(gpu_busy(prof))
            if src.last_stream is not None:  # host blocked on LMDB reads, out of the span
                ranges["kv_read_wait_ms"] = round(src.last_stream.waited_s * 1e3, 3)
            stages[name] = ranges
            (out_dir / f"{name}.txt").write_text(
                prof.key_averages().table(sort_by="self_device_time_total", row_limit=25))
            (out_dir / f"{name}.host.txt").write_text(
                prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            prof.export_chrome_trace(str(out_dir / f"{name}.trace.json"))
            log(f"profile {name}: " + ", ".join(f"{k}={v} ms" for k, v in ranges.items()))
    return stages


def gpu_busy(prof) -> dict:
    """Span from the first CPU op to the last kernel's end, and how much of it the GPU was busy:
    the difference is time the GPU waited for the host."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    cpu_start = min(e.time_range.start for e in prof.events() if e.device_type.name == "CPU")
    if not kernels:
        return {}
    busy, cur_s, cur_e, gaps = 0.0, kernels[0][0], kernels[0][1], []
    for s_, e_ in kernels[1:]:
        if s_ > cur_e:
            busy += cur_e - cur_s
            gaps.append(s_ - cur_e)
            cur_s, cur_e = s_, e_
        else:
            cur_e = max(cur_e, e_)
    busy += cur_e - cur_s
    span = cur_e - cpu_start
    gaps.sort(reverse=True)
    return {"span_ms": round(span / 1e3, 3), "gpu_busy_ms": round(busy / 1e3, 3),
            "before_first_kernel_ms": round((kernels[0][0] - cpu_start) / 1e3, 3),
            "largest_gaps_ms": [round(g / 1e3, 3) for g in gaps[:5]]}


def _variant(row: dict) -> str:
    if row.get("served_default"):
        kept = ", cold chunks streamed and kept in the device tier" if row.get("kept") else ""
        return (f" (DEFAULT SERVED: selection {row['selection']}, loading controller on: "
                f"r = {row.get('ratio_used', row['ratio'])} used{kept})")
    if row.get("selection"):
        checks = f", check layers {row['check_layers']}" if row.get("check_layers") else ""
        return f" (selection {row['selection']}{checks})"
    return " (eager)" if row.get("eager") else " (read whole, then prefill)" if row.get("unstreamed") else ""


def table(result: dict) -> str:
    served = result.get("served", {})
    lines = [f"shape {result['shape']} on {result['device']} ({result['dtype']}), {result['prompt_tokens']} prompt tokens "
             f"({result['n_chunks']} × {result['chunk_tokens']} + question {result['question_tokens']}); "
             f"transformers forward {result['transformers_forward']['median_ms']:.2f} ms; every cell timed in turns, "
             f"median of {result['runs']}", "",
             f"The default served configuration: KV from {served.get('tier')}, blend r={served.get('ratio')}, "
             f"selection {served.get('selection')}.", "",
             "| mode | ratio | KV tier | median TTFT ms | p90 ms | × full | speedup vs full |", "|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: not r.get("served_default")):
        tier = (r["tier"] or "-") + _variant(r)
        lines.append(f"| {r['mode']} | {'-' if r['ratio'] is None else r['ratio']} | {tier} | "
                     f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['median_ms'] / _full_ms(result):.2f} | "
                     f"{r['speedup_vs_full']:.2f}× |")
    if result["sweep"]:
        lines += ["", "| prompt tokens | full ms | blend r=0.15 ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {s['tokens']} | {s['full_ms']:.2f} | {s['blend_ms']:.2f} | {s['speedup']:.2f}× |" for s in result["sweep"]]
    return "\n".join(lines)


def _full_ms(result: dict) -> float:
    return next(r["median_ms"] for r in result["rows"] if r["mode"] == "full")


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sw = result["sweep"]
    if not sw:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [s["tokens"] for s in sw]
    ax.plot(x, [s["full_ms"] for s in sw], "o-", label="full prefill")
    ax.plot(x, [s["blend_ms"] for s in sw], "s-", label="blend r=0.15 (KV on GPU)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms, median)")
    ax.set_title(f"{result['shape']} on {result['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(result: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    text = table(result)
    (out_dir / "bench.md").write_text(text + "\n")
    plot_sweep(result, out_dir / "sweep.png")
    return text
