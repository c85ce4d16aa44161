"""`ragblend bench-serve`: serving throughput and latency of the model's loop (the scheduler the
REST API runs, without HTTP) under Poisson arrivals, for `full` and `blend`; the goodput of each
(the highest rate that keeps p99 TTFT and p99 time per output token within targets,
blend/goodput.py); and the batched decode step's time by batch size and context.

The scheduler is configured as `ragblend serve` configures it: decode slots sized from the free
memory, the batch as large as they allow, its decode graphs captured before anything is timed.
Each request: `n_chunks` chunks drawn from a pool of precomputed chunk KVs (device tier), a fresh
question, `output_tokens` tokens (stop tokens ignored, as benchmarks of serving systems do, so
every request decodes the same length). Latencies count from the request's arrival.
"""
from __future__ import annotations

import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from blend.bench import Tiers, random_layout
from blend.engine import Engine, sync
from blend.goodput import Targets, search
from blend.memory import decode_kv_bytes
from blend.prompt import Layout
from blend.scheduler import Job, Scheduler, SchedulerConfig
from blend.sequence import Answer, SeqState
from blend.spec import KV_MEMORY_SHARE, PREFILL_TOKENS, BlendConfig, Mode, QuerySpec
from store.quant import DEFAULT_FORMAT


@dataclass(frozen=True)
class ServeBenchConfig:
    shape: str = "tiny"
    model_spec: str | None = None       # a real model instead of random weights of `shape`
    device: str = "cpu"
    dtype: str = "float32"
    n_chunks: int = 6
    chunk_tokens: int = 512
    question_tokens: int = 64
    output_tokens: int = 128
    pool: int = 24                      # distinct chunks requests draw from
    requests: int = 32                  # per (mode, batching, rate) row
    rates: tuple[float, ...] = (1.0, 2.0, 4.0)
    modes: tuple[str, ...] = ("full", "blend")
    max_batch: int | None = None        # None: as many as the decode memory holds (as serve)
    ratio: float = 0.15
    step_batches: tuple[int, ...] = (1, 8, 32)
    step_contexts: tuple[int, ...] = (1024, 4096)
    seed: int = 0
    prefill_tokens: int = PREFILL_TOKENS
    kv_memory_share: float = KV_MEMORY_SHARE
    one_at_a_time: bool = True          # also run every rate row with max batch 1
    goodput_outputs: tuple[int, ...] = ()  # output lengths to find goodput at (none: no search)
    goodput_requests: int = 200         # requests per run of the search
    goodput_runs: int = 5               # runs per search, after the burst
    burst: int = 64                     # requests sent at once to find the saturation rate
    ttft_p99_ms: float = 1000.0
    tpot_p99_ms: float = 50.0
    time_budget_s: float | None = None  # wall time for the whole bench: the searches share what is left
    kv_tier: str = "gpu"                # where the pool's chunk KV lives (blend.bench.Tiers): gpu, cpu, lmdb, lmdb-whole


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _engine(cfg: ServeBenchConfig) -> Engine:
    from blend.loader import load_model
    return Engine(load_model(cfg.model_spec or f"random:{cfg.shape}", device=cfg.device, dtype=cfg.dtype))


def workload(cfg: ServeBenchConfig, vocab: int, rate: float, requests: int) -> tuple[list[Layout], list[float]]:
    """Layouts (chunks drawn from the pool) and Poisson arrival offsets, both seeded."""
    base = random_layout(vocab, cfg.pool, cfg.chunk_tokens, cfg.question_tokens, seed=cfg.seed)
    rng = random.Random(f"{cfg.seed}:{rate}")
    g = torch.Generator().manual_seed(cfg.seed + 1)
    layouts, t, arrivals = [], 0.0, []
    for _ in range(requests):
        chunks = rng.sample(base.chunks, cfg.n_chunks)
        question = torch.randint(10, vocab, (cfg.question_tokens,), generator=g).tolist()
        layouts.append(Layout(base.prefix, chunks, question))
        arrivals.append(t)
        t += rng.expovariate(rate)
    return layouts, arrivals


def serving_config(engine: Engine, cfg: ServeBenchConfig, n_tokens: int) -> SchedulerConfig:
    """What `ragblend serve` would configure for requests of `n_tokens` (prompt + answer)."""
    kv_bytes = decode_kv_bytes(engine.parts, engine.model.config, n_tokens + 1, cfg.kv_memory_share)
    return SchedulerConfig.for_memory(engine, kv_bytes, slot_tokens=n_tokens + 1, max_batch=cfg.max_batch,
                                      max_waiting=max(cfg.requests, cfg.goodput_requests, cfg.burst) + 1,
                                      prefill_tokens=cfg.prefill_tokens)


def run_load(sched: Scheduler, kv, cfg: ServeBenchConfig, mode: str, rate: float, output_tokens: int,
             requests: int) -> dict:
    engine, max_batch = sched.engine, sched.config.max_batch
    layouts, arrivals = workload(cfg, engine.model.config.vocab_size, rate, requests)
    spec = QuerySpec(Mode(mode), BlendConfig(ratio=cfg.ratio), max_tokens=output_tokens)
    seqs: dict[int, SeqState] = {}
    answers: dict[int, Answer] = {}
    arrived: dict[int, float] = {}
    done = threading.Semaphore(0)
    batches: list[int] = []
    sched.on_step = lambda n, dt: batches.append(n)

    def job(i: int) -> Job:
        return Job(layouts[i], spec, kv, on_start=lambda s: seqs.__setitem__(i, s),
                   on_done=lambda a: (answers.__setitem__(i, a), done.release()),
                   on_error=lambda e: (print(f"request {i} failed: {e!r}"), done.release()))
    t0 = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrived[i] = time.perf_counter()
        sched.submit(job(i))
    for _ in arrivals:
        done.acquire()
    t_end = time.perf_counter()
    sched.on_step = None
    ttft = [(seqs[i].t_first - arrived[i]) * 1e3 for i in answers]
    tpot = [(seqs[i].t_end - seqs[i].t_first) * 1e3 / max(1, len(a.token_ids) - 1) for i, a in answers.items()]
    tokens = sum(len(a.token_ids) for a in answers.values())
    span = t_end - t0
    return {"mode": mode, "max_batch": max_batch, "rate": rate, "output_tokens": output_tokens,
            "requests": len(answers), "seconds": span,
            "req_per_s": len(answers) / span, "tokens_per_s": tokens / span,
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
            "tpot_p50_ms": percentile(tpot, 0.5), "tpot_p99_ms": percentile(tpot, 0.99),
            "mean_batch": statistics.mean(batches) if batches else 0.0, "max_batch_seen": max(batches, default=0)}


def decode_steps(engine: Engine, batches: tuple[int, ...], contexts: tuple[int, ...], runs: int = 10) -> list[dict]:
    """Median time of one batched decode step with `b` sequences of `ctx` tokens each, on the
    engine's own decode slots (sized for each case)."""
    parts, out = engine.parts, []
    for ctx in contexts:
        if ctx + 2 > engine.max_context:
            continue
        for b in batches:
            batch = engine.reserve_decode(b, ctx + 2 + runs + 3)
            kv = torch.randn(parts.n_layers, 2, parts.n_kv_heads, ctx, parts.head_dim, dtype=parts.dtype,
                             device=parts.device)
            for _ in range(b):
                batch.slots.take(kv)
            del kv
            feed = {s: 1 for s in range(b)}
            times = []
            for r in range(runs + 3):
                sync(parts.device)
                t = time.perf_counter()
                batch.step(feed).argmax(-1).tolist()  # the host sync a served step makes
                times.append((time.perf_counter() - t) * 1e3)
            med = statistics.median(times[3:])
            out.append({"batch": b, "context": ctx, "step_ms": med, "ms_per_sequence": med / b})
            for s in range(b):
                batch.slots.release(s)
    return out


def run_serve_bench(cfg: ServeBenchConfig, log=print) -> dict:
    t_start = time.perf_counter()
    engine = _engine(cfg)
    engine.stop_ids = frozenset()  # every request decodes output_tokens (benchmarks ignore EOS)
    dev = engine.device
    result: dict = {"config": {**cfg.__dict__}, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                    "steps": [], "loads": [], "goodput": []}
    for row in decode_steps(engine, cfg.step_batches, cfg.step_contexts):
        log(f"decode step: batch {row['batch']:>3} × context {row['context']:>6}: {row['step_ms']:8.2f} ms")
        result["steps"].append(row)
    engine.release_decode()  # the step timings' slots: the serving slots are sized from what is free
    vocab = engine.model.config.vocab_size
    base = random_layout(vocab, cfg.pool, cfg.chunk_tokens, cfg.question_tokens, seed=cfg.seed)
    workdir = tempfile.TemporaryDirectory()
    # `lmdb`: streamed from the store per request, as `serve` reads chunks its hot tier lacks
    if cfg.kv_tier in ("gpu", "cpu"):
        tiers = Tiers(engine, base, [cfg.kv_tier], [], Path(workdir.name))
        kv = tiers.caches[cfg.kv_tier]
    else:  # in the store's default format, as `serve` writes it
        tiers = Tiers(engine, base, ["lmdb"], [DEFAULT_FORMAT], Path(workdir.name), whole=cfg.kv_tier == "lmdb-whole")
        kv = tiers.caches[f"{cfg.kv_tier}:{DEFAULT_FORMAT}"]
    longest = max((cfg.output_tokens, *cfg.goodput_outputs))
    n_tokens = workload(cfg, vocab, 1.0, 1)[0][0].n_tokens + longest
    sched = engine.scheduler
    config = serving_config(engine, cfg, n_tokens)
    sched.configure(config)
    t = time.perf_counter()
    sched.start(warm=True)
    while sched.warming:
        time.sleep(0.05)
    log(f"decode slots: {config.slots} × {config.slot_tokens} tokens ({sched.kv_bytes / 2**30:.1f} GiB), max batch "
        f"{config.max_batch}, prefill budget {config.prefill_tokens} tokens/step; graphs warmed in "
        f"{time.perf_counter() - t:.1f} s")
    result["serving"] = {"slots": config.slots, "slot_tokens": config.slot_tokens, "max_batch": config.max_batch,
                         "kv_bytes": sched.kv_bytes, "prefill_tokens": config.prefill_tokens}
    try:
        for mode in cfg.modes:  # a few requests per mode first (prefill graphs, compilation), untimed
            run_load(sched, kv, cfg, mode, 1000.0, min(cfg.output_tokens, 8), 4)
        _loads(sched, kv, cfg, result, log)
        cells = [(out, mode) for out in cfg.goodput_outputs for mode in cfg.modes]
        for i, (out_tokens, mode) in enumerate(cells):
            deadline = None
            if cfg.time_budget_s is not None:  # an equal share of what is left for each search to come
                left = t_start + cfg.time_budget_s - time.perf_counter()
                deadline = time.perf_counter() + left / (len(cells) - i)
            result["goodput"].append(_goodput(sched, kv, cfg, mode, out_tokens, log, deadline))
    finally:
        sched.stop()
        tiers.close()
        workdir.cleanup()
    result["seconds"] = time.perf_counter() - t_start
    log(f"bench-serve took {result['seconds']:.0f} s")
    return result


def _loads(sched: Scheduler, kv, cfg: ServeBenchConfig, result: dict, log) -> None:
    batched = sched.config
    settings = [batched] + ([replace(batched, max_batch=1)] if cfg.one_at_a_time and batched.max_batch > 1 else [])
    for rate in cfg.rates:
        for mode in cfg.modes:
            for config in settings:
                sched.config = config  # the same slots: only the admission limit changes
                row = run_load(sched, kv, cfg, mode, rate, cfg.output_tokens, cfg.requests)
                log(_line(row))
                result["loads"].append(row)
    sched.config = batched


def _line(row: dict) -> str:
    return (f"rate {row['rate']:>6.2f}/s {row['mode']:>5} max_batch {row['max_batch']:>3}: {row['req_per_s']:6.2f} req/s "
            f"{row['tokens_per_s']:8.1f} tok/s  TTFT p50/p99 {row['ttft_p50_ms']:8.1f}/{row['ttft_p99_ms']:8.1f} ms"
            f"  TPOT p50/p99 {row['tpot_p50_ms']:6.1f}/{row['tpot_p99_ms']:6.1f} ms  batch {row['mean_batch']:.1f}"
            f" (max {row['max_batch_seen']})  {row['seconds']:.1f} s")


def _goodput(sched: Scheduler, kv, cfg: ServeBenchConfig, mode: str, out_tokens: int, log,
             deadline: float | None = None) -> dict:
    burst = run_load(sched, kv, cfg, mode, 1e6, out_tokens, cfg.burst)
    log(f"{mode}, {out_tokens} output tokens: saturation {burst['req_per_s']:.2f} req/s (a burst of {cfg.burst})")

    def run(rate: float) -> dict:
        row = run_load(sched, kv, cfg, mode, rate, out_tokens, cfg.goodput_requests)
        log("  " + _line(row))
        return row
    cut: list[float] = []

    def affordable(rate: float) -> bool:
        # served no faster than saturation (a run past it queues), then about the burst's drain time
        need = cfg.goodput_requests / min(rate, burst["req_per_s"]) + burst["seconds"] / 2
        ok = deadline is None or time.perf_counter() + need <= deadline
        if not ok:
            cut.append(rate)
        return ok
    found = search(run, burst["req_per_s"], Targets(cfg.ttft_p99_ms, cfg.tpot_p99_ms), cfg.goodput_runs,
                   affordable=affordable)
    if cut:
        log(f"  (the time budget ended this search after {len(found.runs)} runs)")
    at = next((r for r in found.runs if r["met"] and r["rate"] == found.rate), None)
    log(f"{mode}, {out_tokens} output tokens: goodput {found.rate:.2f} req/s"
        + (f" ({at['tokens_per_s']:.0f} output tok/s, TTFT p99 {at['ttft_p99_ms']:.0f} ms, TPOT p99 "
           f"{at['tpot_p99_ms']:.1f} ms)" if at else "") + (f"; {found.failed_at:.2f} req/s did not hold"
                                                             if found.failed_at else ""))
    return {"mode": mode, "output_tokens": out_tokens, "goodput": found.rate, "failed_at": found.failed_at,
            "saturation": found.saturation, "at_goodput": at, "runs": found.runs}


def table(result: dict) -> str:
    c = result["config"]
    lines = [f"bench-serve: {c['model_spec'] or c['shape']} on {result['device']} ({c['dtype']}); "
             f"{c['n_chunks']} × {c['chunk_tokens']} chunk tokens from a pool of {c['pool']}, "
             f"{c['question_tokens']}-token question, {c['output_tokens']} output tokens, "
             f"{c['requests']} requests per row, Poisson arrivals", "",
             "| rate (req/s) | mode | max batch | done req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | "
             "TPOT p50 ms | TPOT p99 ms | mean batch |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["loads"]:
        lines.append(f"| {r['rate']:g} | {r['mode']} | {r['max_batch']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['tpot_p50_ms']:.2f} | {r['tpot_p99_ms']:.2f} | "
                     f"{r['mean_batch']:.1f} |")
    if result.get("goodput"):
        t = f"p99 TTFT ≤ {c['ttft_p99_ms']:g} ms and p99 TPOT ≤ {c['tpot_p99_ms']:g} ms over {c['goodput_requests']} requests"
        lines += ["", f"Goodput ({t}; the search's runs are in serve.json):", "",
                  "| output tokens | mode | goodput req/s | output tok/s there | TTFT p99 ms | TPOT p50 / p99 ms | "
                  "did not hold at | saturation req/s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for g in result["goodput"]:
            at = g["at_goodput"] or {}
            fmt = lambda k, f="{:.1f}": f.format(at[k]) if k in at else "–"  # noqa: E731
            lines.append(f"| {g['output_tokens']} | {g['mode']} | **{g['goodput']:.2f}** | {fmt('tokens_per_s', '{:.0f}')} | "
                         f"{fmt('ttft_p99_ms', '{:.0f}')} | {fmt('tpot_p50_ms')} / {fmt('tpot_p99_ms')} | "
                         f"{g['failed_at'] and round(g['failed_at'], 2) or '–'} | {g['saturation']:.2f} |")
        for out in sorted({g["output_tokens"] for g in result["goodput"]}):
            f = next((g for g in result["goodput"] if g["mode"] == "full" and g["output_tokens"] == out), None)
            b = next((g for g in result["goodput"] if g["mode"] == "blend" and g["output_tokens"] == out), None)
            if f and b and f["goodput"]:
                lines.append(f"\nblend / full goodput at {out} output tokens: {b['goodput'] / f['goodput']:.2f}×")
    if "serving" in result:
        sv = result["serving"]
        lines += ["", f"Decode slots: {sv['slots']} × {sv['slot_tokens']} tokens ({sv['kv_bytes'] / 2**30:.1f} GiB), "
                      f"max batch {sv['max_batch']}, prefill budget {sv['prefill_tokens']} tokens per step; "
                      f"the run took {result.get('seconds', 0):.0f} s."]
    if result["steps"]:
        lines += ["", "| decode step | context | step ms | ms per sequence |", "|---:|---:|---:|---:|"]
        for s in result["steps"]:
            lines.append(f"| batch {s['batch']} | {s['context']} | {s['step_ms']:.2f} | {s['ms_per_sequence']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in result["config"]["modes"]:
        for mb in sorted({r["max_batch"] for r in result["loads"]}, reverse=True):
            rows = sorted((r for r in result["loads"] if r["mode"] == mode and r["max_batch"] == mb),
                          key=lambda r: r["rate"])
            if not rows:
                continue
            label = f"{mode}, max batch {mb}"
            a.plot([r["rate"] for r in rows], [r["ttft_p99_ms"] / 1e3 for r in rows], "o-", label=label)
            b.plot([r["rate"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=label)
    a.set(xlabel="request rate (req/s)", ylabel="TTFT p99 (s)", yscale="log", xscale="log")
    b.set(xlabel="request rate (req/s)", ylabel="output tokens/s", xscale="log")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(result)
    (out_dir / "serve.md").write_text(md)
    if result["loads"]:
        plot(result, out_dir / "serve.png")
    return md
