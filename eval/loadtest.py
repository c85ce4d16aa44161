r"""Load test of `ragblend serve`: N concurrent clients POST /v1/query for a fixed time; prints one
table (requests sent, answered, refused, 5xx, errors, latency percentiles, throughput, server RSS)
and writes it as JSON.

Either against a running server (`--url`, and `--pid` for its memory), or one it starts itself
(`--serve`, flags after `--` go to `ragblend serve`):

    ragblend index samples/corpus --data-dir .data/load --chunk-tokens 128
    python eval/loadtest.py --serve --clients 32 --duration 60 --max-tokens 8 --out out/loadtest.json \
        -- --model default --data-dir .data/load --chunk-tokens 128 --log-level warning

Refused requests (503/429 with Retry-After) are retried after the time the server asks for, as
a polite client would; a 5xx without Retry-After is a server error and should never happen.
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer

QUESTIONS = [
    "Who designed the Halvard Bridge?",
    "Where was Mira Solberg born?",
    "How long is the Lenna River?",
    "When did the Halvard Bridge open to traffic?",
    "How many people live in Ostmark?",
    "What is Kettavik known for?",
    "When is the salmon fishing season on the Lenna?",
    "What does the Halvard Bridge carry?",
]


@dataclass(frozen=True)
class Load:
    """What the clients send, and where."""

    url: str
    api_key: str | None
    clients: int
    duration: float
    max_tokens: int
    top_k: int
    mode: str
    ratio: float
    timeout: float


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    refused: int = 0
    server_errors: int = 0
    client_errors: int = 0       # 4xx other than 429: a bug in this script or the server
    transport_errors: int = 0    # connection refused/reset, timeouts
    latencies_s: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # first few unexpected answers, for the report
    alone: dict[str, str] = field(default_factory=dict)  # question → its answer when sent alone (greedy)
    differ: int = 0              # answers under load unlike the same request's answer alone


def rss_kib(pid: int | None) -> dict[str, int] | None:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB, from /proc/PID/status."""
    if pid is None:
        return None
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def client_loop(client: httpx.AsyncClient, idx: int, stop_at: float, args: Load, tally: Tally) -> None:
    n = idx
    while time.monotonic() < stop_at:
        question = QUESTIONS[n % len(QUESTIONS)]
        n += args.clients
        tally.sent += 1
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/query", json={"question": question, "top_k": args.top_k, "mode": args.mode,
                                                     "ratio": args.ratio, "max_tokens": args.max_tokens})
        except httpx.HTTPError as e:
            tally.transport_errors += 1
            if len(tally.samples) < 5:
                tally.samples.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.5)
            continue
        elapsed = time.perf_counter() - t0
        if r.status_code == 200:
            tally.ok += 1
            tally.latencies_s.append(elapsed)
            body = r.json()
            if body["answer"] != tally.alone.get(question, body["answer"]):
                tally.differ += 1
                if len(tally.samples) < 5:
                    tally.samples.append(f"differs from alone: {question!r}: {body['answer']!r} vs {tally.alone[question]!r}")
            timings = body["timings"]
            tally.ttft_ms.append(timings["ttft_ms"])
            tally.queue_ms.append(timings["queue_ms"])
        elif r.status_code in (429, 503) and "retry-after" in r.headers:
            tally.refused += 1
            await asyncio.sleep(min(float(r.headers["retry-after"]), max(0.0, stop_at - time.monotonic())))
        else:
            if r.status_code >= 500:
                tally.server_errors += 1
            else:
                tally.client_errors += 1
            if len(tally.samples) < 5:
                tally.samples.append(f"{r.status_code}: {r.text[:300]}")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)


async def run(args: Load, pid: int | None) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        health = (await client.get("/health")).json()
        if health["index_chunks"] == 0:
            raise SystemExit("the server's index is empty: index samples/corpus first (see --help)")
        # Warm up: the embedder loads on the first query, and the first chunk KVs enter the hot tier.
        # Each question is sent alone: its greedy answer is what every answer under load must equal.
        tally = Tally()
        for q in QUESTIONS:
            r = await client.post("/v1/query", json={"question": q, "top_k": args.top_k, "mode": args.mode,
                                                     "ratio": args.ratio, "max_tokens": args.max_tokens})
            r.raise_for_status()
            tally.alone[q] = r.json()["answer"]
        rss_before = rss_kib(pid)
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        await asyncio.gather(*(client_loop(client, i, stop_at, args, tally) for i in range(args.clients)))
        wall = time.monotonic() - t0
        rss_after = rss_kib(pid)
        metrics = (await client.get("/metrics")).text
    lat = sorted(tally.latencies_s)
    return {
        "config": {"url": args.url, "clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
                   "top_k": args.top_k, "mode": args.mode, "ratio": args.ratio, "model": health["model"],
                   "index_chunks": health["index_chunks"], "max_queue": health["max_queue"]},
        "wall_s": round(wall, 2),
        "sent": tally.sent, "answered_200": tally.ok, "refused_429_503": tally.refused,
        "server_errors_5xx": tally.server_errors, "client_errors_4xx": tally.client_errors,
        "transport_errors": tally.transport_errors, "answers_unlike_alone": tally.differ,
        "latency_s": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": lat[-1] if lat else None},
        "server_ttft_ms": {"p50": pct(sorted(tally.ttft_ms), 50), "p99": pct(sorted(tally.ttft_ms), 99)},
        "server_queue_ms": {"p50": pct(sorted(tally.queue_ms), 50), "p99": pct(sorted(tally.queue_ms), 99)},
        "answered_per_s": round(tally.ok / wall, 3), "sent_per_s": round(tally.sent / wall, 3),
        "server_rss_kib": {"before": rss_before, "after": rss_after},
        "server_hot_tier": {k: _metric(metrics, f"ragblend_hot_tier_{k}_total") for k in ("hits", "misses")},
        "unexpected": tally.samples,
    }


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def report(res: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f} ms"

    def mib(d, k):
        return "-" if not d else f"{d[k] / 1024:.0f} MiB"

    c, rss = res["config"], res["server_rss_kib"]
    rows = [
        ("server", f"{c['url']}  model={c['model']}  index={c['index_chunks']} chunks  max_queue={c['max_queue']}"),
        ("load", f"{c['clients']} clients x {res['wall_s']} s, /v1/query mode={c['mode']} top_k={c['top_k']} "
                 f"max_tokens={c['max_tokens']}"),
        ("requests sent", res["sent"]),
        ("answered 200", res["answered_200"]),
        ("refused 429/503", res["refused_429_503"]),
        ("5xx (must be 0)", res["server_errors_5xx"]),
        ("answers unlike the same request alone (must be 0)", res["answers_unlike_alone"]),
        ("other errors", f"{res['client_errors_4xx']} 4xx, {res['transport_errors']} transport"),
        ("latency p50 / p90 / p99", " / ".join(ms(res["latency_s"][k]) for k in ("p50", "p90", "p99"))),
        ("server TTFT p50 / p99", " / ".join("-" if v is None else f"{v:.0f} ms"
                                             for v in res["server_ttft_ms"].values())),
        ("server queue wait p50 / p99", " / ".join("-" if v is None else f"{v:.0f} ms"
                                                   for v in res["server_queue_ms"].values())),
        ("answered/s (sent/s)", f"{res['answered_per_s']:.2f} ({res['sent_per_s']:.2f})"),
        ("server RSS before -> after", f"{mib(rss['before'], 'VmRSS')} -> {mib(rss['after'], 'VmRSS')} "
                                        f"(peak {mib(rss['after'], 'VmHWM')})"),
        ("hot tier hits / misses", f"{res['server_hot_tier']['hits']:.0f} / {res['server_hot_tier']['misses']:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"unexpected: {s}" for s in res["unexpected"]]
    return "\n".join(lines)


async def batch_check(args: Load, n: int) -> dict:
    """`n` questions sent one after another, then the same `n` at once: the wall time of each way
    and whether every answer is the same (greedy). Batching shows as at-once time well under the
    one-after-another time."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout) as client:
        async def ask(q: str) -> str:
            r = await client.post("/v1/query", json={"question": q, "top_k": args.top_k, "mode": args.mode,
                                                     "ratio": args.ratio, "max_tokens": args.max_tokens})
            r.raise_for_status()
            return r.json()["answer"]
        await ask(questions[0])  # untimed: the first request pays one-off costs
        t0 = time.perf_counter()
        one_by_one = [await ask(q) for q in questions]
        t1 = time.perf_counter()
        at_once = await asyncio.gather(*(ask(q) for q in questions))
        t2 = time.perf_counter()
    return {"questions": n, "max_tokens": args.max_tokens, "one_after_another_s": t1 - t0, "at_once_s": t2 - t1,
            "ratio": (t2 - t1) / (t1 - t0), "answers_equal": list(at_once) == one_by_one}


def start_server(serve_args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not healthy after 300 s; see {log}")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown")


@app.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
def main(
    serve_args: Annotated[Optional[list[str]], typer.Argument(
        metavar="SERVE_ARGS", help="with --serve: flags for `ragblend serve`, after --")] = None,
    url: Annotated[str, typer.Option(help="a running server (ignored with --serve)")] = "http://127.0.0.1:8000",
    pid: Annotated[Optional[int], typer.Option(help="the running server's pid, for its memory")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="start `ragblend serve` (args after --) and stop it after")] = False,
    api_key: Annotated[Optional[str], typer.Option(envvar="RAGBLEND_API_KEY")] = None,
    clients: int = 32,
    duration: Annotated[float, typer.Option(help="seconds of load")] = 60.0,
    max_tokens: int = 8,
    top_k: int = 4,
    mode: str = "blend",
    ratio: float = 0.15,
    timeout: Annotated[float, typer.Option(help="per request, seconds")] = 300.0,
    out: Annotated[Optional[Path], typer.Option(help="write the results as JSON here")] = None,
    batch_check_n: Annotated[int, typer.Option("--batch-check", help="instead of the timed load: N questions one "
                                                                    "after another, then N at once")] = 0,
) -> None:
    proc = None
    if serve:
        log = (out.parent if out else Path(".")) / "loadtest-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc, url = start_server(serve_args or [], log)
        pid = proc.pid
    load = Load(url=url, api_key=api_key, clients=clients, duration=duration, max_tokens=max_tokens, top_k=top_k,
                mode=mode, ratio=ratio, timeout=timeout)
    try:
        res = asyncio.run(batch_check(load, batch_check_n) if batch_check_n else run(load, pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(res, indent=1) if batch_check_n else report(res))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"→ {out}")


if __name__ == "__main__":
    app()
