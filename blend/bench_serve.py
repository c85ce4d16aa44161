"""`ragblend bench-serve`: serving throughput and latency of the scheduler (the path the REST API
runs, without HTTP) under Poisson arrivals, for `full` and `blend`, with batching on and off, all
in one process; plus the batched decode step's time by batch size and context.

Each request: `n_chunks` chunks drawn from a pool of precomputed chunk KVs (device tier), a fresh
question, `output_tokens` tokens (stop tokens ignored, as benchmarks of serving systems do, so
every request decodes the same length). Latencies count from the request's arrival.
"""
from __future__ import annotations

import json
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from blend.batch import DecodeBatch, KVSlots
from blend.bench import random_layout
from blend.engine import UNBOUNDED, Engine, sync
from blend.loader import LoadedModel, fingerprint
from blend.prompt import Layout
from blend.scheduler import Job, Scheduler, SchedulerConfig
from blend.sequence import Answer, SeqState
from blend.shapes import random_model
from blend.spec import BlendConfig, Mode, QuerySpec


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
    requests: int = 32                  # per (mode, batching, rate)
    rates: tuple[float, ...] = (1.0, 2.0, 4.0)
    modes: tuple[str, ...] = ("full", "blend")
    max_batch: int = 32
    ratio: float = 0.15
    step_batches: tuple[int, ...] = (1, 8, 32)
    step_contexts: tuple[int, ...] = (1024, 4096)
    seed: int = 0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _engine(cfg: ServeBenchConfig) -> Engine:
    from blend.loader import load_model, parse_dtype
    if cfg.model_spec is not None:
        return Engine(load_model(cfg.model_spec, device=cfg.device, dtype=cfg.dtype))
    model = random_model(cfg.shape, dtype=parse_dtype(cfg.dtype), device=cfg.device, seed=0)
    return Engine(LoadedModel(model, None, f"random:{cfg.shape}", fingerprint(model)))


def workload(cfg: ServeBenchConfig, vocab: int, rate: float) -> tuple[list[Layout], list[float]]:
    """Layouts (chunks drawn from the pool) and Poisson arrival offsets, both seeded."""
    base = random_layout(vocab, cfg.pool, cfg.chunk_tokens, cfg.question_tokens, seed=cfg.seed)
    rng = random.Random(f"{cfg.seed}:{rate}")
    g = torch.Generator().manual_seed(cfg.seed + 1)
    layouts, t, arrivals = [], 0.0, []
    for _ in range(cfg.requests):
        chunks = rng.sample(base.chunks, cfg.n_chunks)
        question = torch.randint(10, vocab, (cfg.question_tokens,), generator=g).tolist()
        layouts.append(Layout(base.prefix, chunks, question))
        arrivals.append(t)
        t += rng.expovariate(rate)
    return layouts, arrivals


def scheduler_for(engine: Engine, cfg: ServeBenchConfig, max_batch: int, n_tokens: int) -> Scheduler:
    """One scheduler per batching setting, kept across rows, its decode graphs captured up front
    for requests of `n_tokens` (prompt + answer)."""
    sched = Scheduler(engine, SchedulerConfig(max_batch=max_batch, slots=max_batch, slot_tokens=n_tokens + 1,
                                              max_waiting=cfg.requests + 1))
    sched.batch.warm(n_tokens, max_batch)
    return sched.start()


def run_load(sched: Scheduler, kv, cfg: ServeBenchConfig, mode: str, rate: float) -> dict:
    engine, max_batch = sched.engine, sched.config.max_batch
    vocab = engine.model.config.vocab_size
    layouts, arrivals = workload(cfg, vocab, rate)
    spec = QuerySpec(Mode(mode), BlendConfig(ratio=cfg.ratio), max_tokens=cfg.output_tokens)
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
    return {"mode": mode, "max_batch": max_batch, "rate": rate, "requests": len(answers), "seconds": span,
            "req_per_s": len(answers) / span, "tokens_per_s": tokens / span,
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
            "tpot_p50_ms": percentile(tpot, 0.5), "tpot_p99_ms": percentile(tpot, 0.99),
            "mean_batch": statistics.mean(batches) if batches else 0.0}


def decode_steps(engine: Engine, batches: tuple[int, ...], contexts: tuple[int, ...], runs: int = 10) -> list[dict]:
    """Median time of one batched decode step with `b` sequences of `ctx` tokens each."""
    parts, out = engine.parts, []
    for ctx in contexts:
        if ctx + 2 > engine.max_context:
            continue
        for b in batches:
            slots = KVSlots(parts, b, ctx + 2 + runs + 3)
            batch = DecodeBatch(parts, slots)
            kv = torch.randn(parts.n_layers, 2, parts.n_kv_heads, ctx, parts.head_dim, dtype=parts.dtype,
                             device=parts.device)
            for _ in range(b):
                slots.take(kv)
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
            del slots, batch
            if parts.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def run_serve_bench(cfg: ServeBenchConfig, log=print) -> dict:
    engine = _engine(cfg)
    engine.stop_ids = frozenset()  # every request decodes output_tokens (benchmarks ignore EOS)
    dev = engine.device
    result: dict = {"config": {**cfg.__dict__}, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                    "steps": [], "loads": []}
    for row in decode_steps(engine, cfg.step_batches, cfg.step_contexts):
        log(f"decode step: batch {row['batch']:>3} × context {row['context']:>6}: {row['step_ms']:8.2f} ms")
        result["steps"].append(row)
    base = random_layout(engine.model.config.vocab_size, cfg.pool, cfg.chunk_tokens, cfg.question_tokens, seed=cfg.seed)
    kv = engine.kv_cache(base.prefix, gpu_bytes=UNBOUNDED, stream=False)
    for ids in base.chunks:
        kv.ensure(ids)
    n_tokens = workload(cfg, engine.model.config.vocab_size, 1.0)[0][0].n_tokens + cfg.output_tokens
    scheds = {mb: scheduler_for(engine, cfg, mb, n_tokens) for mb in sorted({1, cfg.max_batch}, reverse=True)}
    try:
        # a few requests per mode first (prefill graphs, compilation), before anything is timed
        warm = ServeBenchConfig(**{**cfg.__dict__, "requests": 4})
        for mode in cfg.modes:
            for sched in scheds.values():
                run_load(sched, kv, warm, mode, 1000.0)
        _loads(scheds, kv, cfg, result, log)
    finally:
        for sched in scheds.values():
            sched.stop()
    return result


def _loads(scheds: dict[int, Scheduler], kv, cfg: ServeBenchConfig, result: dict, log) -> None:
    for rate in cfg.rates:
        for mode in cfg.modes:
            for mb, sched in scheds.items():
                row = run_load(sched, kv, cfg, mode, rate)
                log(f"rate {rate:>6.2f}/s {mode:>5} max_batch {mb:>3}: {row['req_per_s']:6.2f} req/s "
                    f"{row['tokens_per_s']:8.1f} tok/s  TTFT p50/p99 {row['ttft_p50_ms']:8.1f}/{row['ttft_p99_ms']:8.1f} ms"
                    f"  TPOT p50/p99 {row['tpot_p50_ms']:6.1f}/{row['tpot_p99_ms']:6.1f} ms  batch {row['mean_batch']:.1f}")
                result["loads"].append(row)


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
