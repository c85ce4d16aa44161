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
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from blend.engine import UNBOUNDED, Engine, sync
from blend.loader import LoadedModel, fingerprint
from blend.prompt import Layout
from blend.shapes import random_model
from blend.spec import DEFAULT_CHECK_LAYER, DEFAULT_RATIO, DEFAULT_SELECTION, BlendConfig, Mode, QuerySpec
from store import KVStore
from store.tiers import ChunkKVCache, ChunkKVSource


def timed(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "runs": runs}


def timed_together(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                   runs: int) -> dict[str, dict]:
    """Like `timed` for several functions, run in turns (a, b, c, a, b, c, …), so that a drift
    of the machine (clocks, temperature, neighbours) falls on all of them alike."""
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


def random_layout(vocab: int, n_chunks: int, chunk_tokens: int, question_tokens: int,
                  prefix_tokens: int = 32, seed: int = 0) -> Layout:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    return Layout(ids(prefix_tokens), [ids(chunk_tokens) for _ in range(n_chunks)], ids(question_tokens))


class Tiers:
    """The same chunk KVs behind each tier, as configurations of the cache the service uses: held
    in device memory, in pinned CPU memory, or in an LMDB store (streamed layer by layer on CUDA,
    or read whole before the prefill: `lmdb-whole`)."""

    def __init__(self, engine: Engine, layout: Layout, tiers: Sequence[str], workdir: Path):
        self.store = None
        self.caches: dict[str, ChunkKVCache] = {}
        for tier in tiers:
            if tier == "gpu":
                cache = engine.kv_cache(layout.prefix, gpu_bytes=UNBOUNDED)
            elif tier == "cpu":  # pinned host memory (on a CPU device, plain memory: the device tier)
                on_cpu = engine.device.type == "cpu"
                cache = engine.kv_cache(layout.prefix, gpu_bytes=UNBOUNDED if on_cpu else 0, cpu_bytes=UNBOUNDED)
            else:
                if self.store is None:
                    self.store = KVStore(workdir / "kv.lmdb", map_size=1 << 32)
                cache = engine.kv_cache(layout.prefix, store=self.store, gpu_bytes=0, cpu_bytes=0,
                                        stream=tier == "lmdb")
            for ids in layout.chunks:
                cache.ensure(ids)
            self.caches[tier] = cache

    def close(self) -> None:
        for cache in self.caches.values():
            cache.close()
        if self.store is not None:
            self.store.close()


def ttft(engine: Engine, layout: Layout, spec: QuerySpec, kv: ChunkKVSource) -> int:
    """The served path (engine.generate) to its first token, which is then on the host."""
    return engine.generate(layout, replace(spec, max_tokens=1), kv).run().token_ids[0]


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


TIERS = ("gpu", "cpu", "lmdb")


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Random weights of `cfg.shape`, or the real model `cfg.model_spec` (timing does not depend on
    the weights; the prompt is random token ids either way)."""
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
                 "check_layer": cfg.check_layer, "selection": DEFAULT_SELECTION, "warmup": warmup, "runs": runs,
                 "rows": [], "sweep": []}
    tiers = list(cfg.tiers)
    streams = "lmdb" in tiers and engine.graphs is not None  # else lmdb is read whole anyway
    with tempfile.TemporaryDirectory() as tmp:
        store_tiers = Tiers(engine, layout, tiers + (["lmdb-whole"] if streams else []), Path(tmp))
        caches = store_tiers.caches
        ids = torch.tensor([layout.ids()], device=dev)

        def hf_forward():
            with torch.inference_mode():
                return int(model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())

        base = timed(hf_forward, dev, warmup, runs)
        out["transformers_forward"] = base
        log(f"transformers forward: {base['median_ms']:.2f} ms")
        full = timed(lambda: ttft(engine, layout, QuerySpec(Mode.FULL), caches[tiers[0]]), dev, warmup, runs)
        rows = [{"mode": "full", "ratio": None, "tier": None, **full}]
        plans = [QuerySpec(Mode.PREFIX), QuerySpec(Mode.REUSE)] + [cfg.blend(r) for r in cfg.ratios]
        for tier in tiers:
            for spec in plans:
                stats = timed(lambda: ttft(engine, layout, spec, caches[tier]), dev, warmup, runs)
                rows.append({"mode": spec.mode.value, "ratio": spec.describe()["ratio"], "tier": tier, **stats})
        if cfg.selections:  # what each selector costs: blend r=0.15, KV on the first tier, timed in turns
            schedules = [()] + ([cfg.gradual] if cfg.gradual else [])
            fns = {(sel, g): (lambda spec=cfg.blend(selection=sel, checks=g): ttft(engine, layout, spec, caches[tiers[0]]))
                   for sel in cfg.selections for g in schedules}
            for (sel, g), stats in timed_together(fns, dev, warmup, 3 * runs).items():
                rows.append({"mode": "blend", "ratio": DEFAULT_RATIO, "tier": tiers[0], "selection": sel,
                             **({"check_layers": ",".join(map(str, g))} if g else {}), **stats})
        if streams:  # what streaming the layers buys
            for spec in (QuerySpec(Mode.REUSE), cfg.blend()):
                stats = timed(lambda: ttft(engine, layout, spec, caches["lmdb-whole"]), dev, warmup, runs)
                rows.append({"mode": spec.mode.value, "ratio": spec.describe()["ratio"], "tier": "lmdb",
                             "unstreamed": True, **stats})
        if engine.graphs is not None:  # the same path without CUDA graphs, to show what they buy
            graphs, engine.graphs = engine.graphs, None
            for spec in (QuerySpec(Mode.REUSE), cfg.blend()):
                stats = timed(lambda: ttft(engine, layout, spec, caches[tiers[0]]), dev, warmup, runs)
                rows.append({"mode": spec.mode.value, "ratio": spec.describe()["ratio"], "tier": tiers[0],
                             "eager": True, **stats})
            engine.graphs = graphs
        for row in rows:
            row["speedup_vs_full"] = full["median_ms"] / row["median_ms"]
            log(f"{row['mode']:>7} r={row['ratio']!s:>5} tier={row['tier']!s:>5}{_variant(row)}: "
                f"median {row['median_ms']:8.2f} ms  p90 {row['p90_ms']:8.2f}  speedup {row['speedup_vs_full']:.2f}x")
        out["rows"] = rows
        if cfg.profile_dir is not None and dev.type == "cuda":
            out["profile"] = profile(engine, layout, cfg, caches, tiers, cfg.profile_dir, log)
        store_tiers.close()
    for n in cfg.sweep:
        n_ch = max(1, (n - cfg.question_tokens - 32) // cfg.chunk_tokens)
        lay = random_layout(vocab, n_ch, cfg.chunk_tokens, cfg.question_tokens, seed=n)
        if lay.n_tokens > engine.max_context:
            continue
        mem = engine.memory_cache(lay)
        f = timed(lambda: ttft(engine, lay, QuerySpec(Mode.FULL), mem), dev, 1, max(3, runs // 2))
        b = timed(lambda: ttft(engine, lay, cfg.blend(), mem), dev, 1, max(3, runs // 2))
        out["sweep"].append({"tokens": lay.n_tokens, "full_ms": f["median_ms"], "blend_ms": b["median_ms"],
                             "speedup": f["median_ms"] / b["median_ms"]})
        log(f"sweep {lay.n_tokens:6d} tokens: full {f['median_ms']:8.2f} ms  blend r=0.15 {b['median_ms']:8.2f} ms  "
            f"speedup {f['median_ms'] / b['median_ms']:.2f}x")
    return out


def profile(engine: Engine, layout: Layout, cfg: BenchConfig, caches: dict[str, ChunkKVCache],
            tier_names: Sequence[str], out_dir: Path, log: Callable[[str], None]) -> dict:
    """Where a request's time goes: stage wall times (synchronized) and the top CUDA kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out_dir.mkdir(parents=True, exist_ok=True)
    stages: dict = {}
    for tier in tier_names:
        for spec in (QuerySpec(Mode.REUSE), cfg.blend()):
            src = caches[tier]
            ttft(engine, layout, spec, src)
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ttft(engine, layout, spec, src)
            ratio = spec.describe()["ratio"]
            name = f"{spec.mode.value}{'' if ratio is None else f'-{ratio}'}-{tier}"
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
    if row.get("selection"):
        checks = f", check layers {row['check_layers']}" if row.get("check_layers") else ""
        return f" (selection {row['selection']}{checks})"
    return " (eager)" if row.get("eager") else " (read whole, then prefill)" if row.get("unstreamed") else ""


def table(result: dict) -> str:
    lines = [f"shape {result['shape']} on {result['device']} ({result['dtype']}), {result['prompt_tokens']} prompt tokens "
             f"({result['n_chunks']} × {result['chunk_tokens']} + question {result['question_tokens']}); "
             f"transformers forward {result['transformers_forward']['median_ms']:.2f} ms", "",
             "| mode | ratio | KV tier | median TTFT ms | p90 ms | speedup vs full |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tier = (r["tier"] or "-") + _variant(r)
        lines.append(f"| {r['mode']} | {'-' if r['ratio'] is None else r['ratio']} | {tier} | "
                     f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['speedup_vs_full']:.2f}× |")
    if result["sweep"]:
        lines += ["", "| prompt tokens | full ms | blend r=0.15 ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {s['tokens']} | {s['full_ms']:.2f} | {s['blend_ms']:.2f} | {s['speedup']:.2f}× |" for s in result["sweep"]]
    return "\n".join(lines)


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
