r"""Idle-connection flood against a running `ragblend serve` (issue 23, Show 4): several processes
open `--connections` TCP connections in all and never send a byte, holding them for `--hold`
seconds, while this process probes GET /health every `--probe-interval` seconds with a 1 s
timeout. Bounded in count and time: it stops by itself. Prints one table, writes one JSON, and
exits 1 if a probe failed or took 1 s or more.

    python -m api.cli serve --data-dir .data/demo --model random:tiny-smol --log-level warning &
    python -m eval.idle_flood --url http://127.0.0.1:8000 --connections 20000 --hold 30 --out out/flood.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import selectors
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def _hold(host: str, port: int, n: int, hold: float, out: mp.Queue) -> None:
    """Open `n` connections (non-blocking), keep them silent for `hold` s; report how many opened and
    how many the server closed meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    opened = failed = closed = 0
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        if s.connect_ex((host, port)) not in (0, 115):  # 115: EINPROGRESS
            failed += 1
            s.close()
            continue
        sel.register(s, selectors.EVENT_READ)
        opened += 1
    open_s = time.monotonic() - t0
    deadline = t0 + hold
    while time.monotonic() < deadline and sel.get_map():
        for key, _ in sel.select(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                closed += 1
                sel.unregister(s)
                s.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    out.put({"opened": opened, "failed": failed, "closed_by_server": closed, "open_seconds": round(open_s, 2)})


def run(url: str, connections: int, processes: int, hold: float, interval: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    share = [connections // processes + (i < connections % processes) for i in range(processes)]
    procs = [ctx.Process(target=_hold, args=(host, port, n, hold, out), daemon=True) for n in share]
    probes: list[float] = []
    failures: list[str] = []
    failed_at: list[float] = []
    with httpx.Client(timeout=1.0) as client:
        t0 = time.monotonic()
        for p in procs:
            p.start()
        while time.monotonic() - t0 < hold + 1.0:
            t = time.monotonic()
            try:
                r = client.get(f"{url}/health", headers={"connection": "close"})
                if r.status_code not in (200,):
                    failures.append(f"status {r.status_code}")
            except httpx.HTTPError as e:
                failures.append(type(e).__name__)
                failed_at.append(round(t - t0, 1))
            probes.append(time.monotonic() - t)
            time.sleep(max(0.0, interval - (time.monotonic() - t)))
    held = [out.get(timeout=hold + 60) for _ in procs]
    for p in procs:
        p.join(10)
    probes.sort()
    return {"connections": connections, "processes": processes, "hold_s": hold,
            "opened": sum(h["opened"] for h in held), "connect_failed": sum(h["failed"] for h in held),
            "closed_by_server": sum(h["closed_by_server"] for h in held),
            "open_seconds": max(h["open_seconds"] for h in held),
            "probes": len(probes), "probe_failures": len(failures), "failure_kinds": sorted(set(failures)),
            "failed_at_s": failed_at,
            "probe_ms": {"p50": round(probes[len(probes) // 2] * 1e3, 1),
                         "p99": round(probes[min(len(probes) - 1, int(len(probes) * 0.99))] * 1e3, 1),
                         "max": round(probes[-1] * 1e3, 1)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--connections", type=int, default=20_000)
    p.add_argument("--processes", type=int, default=4, help="client processes (each needs a descriptor per connection)")
    p.add_argument("--hold", type=float, default=30.0)
    p.add_argument("--probe-interval", type=float, default=0.2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = run(a.url.rstrip("/"), a.connections, a.processes, a.hold, a.probe_interval)
    rows = [("idle connections opened", f"{res['opened']} of {res['connections']} ({res['connect_failed']} refused), "
                                        f"in {res['open_seconds']} s"),
            ("closed by the server", f"{res['closed_by_server']} within {res['hold_s']:g} s"),
            ("/health probes", f"{res['probes']}, {res['probe_failures']} failed {res['failure_kinds'] or ''}"),
            ("/health latency", f"p50 {res['probe_ms']['p50']} ms, p99 {res['probe_ms']['p99']} ms, "
                                f"max {res['probe_ms']['max']} ms (must be < 1000)")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    return 0 if res["probe_failures"] == 0 and res["probe_ms"]["max"] < 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
