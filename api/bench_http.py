"""`ragblend bench-http`: goodput of `ragblend serve` itself, over HTTP — the same workload and
the same search as `bench-serve`'s in-process goodput (blend/goodput.py), so the two can be put
side by side and the cost of the server (HTTP, SSE, retrieval, the event loop beside the model's
thread) read off.

It starts `ragblend serve` as a child process on a fresh data dir (any `serve` flag can follow
`--`), waits until `/health` is ok (the decode graphs warmed), indexes `pool` documents of about
`chunk_tokens` tokens each (one chunk each) through `POST /v1/documents`, then sends Poisson
arrivals of streamed `/v1/query` requests (`top_k` chunks, a question of about
`question_tokens` tokens, `max_tokens` answer tokens). TTFT is the client's: from sending the
request to its first `event: token`; time per output token is (done − first token) / (tokens − 1),
the tokens counted by the server's usage. Stop tokens end an answer early here (the API has no
way to ignore them); a random-weight model meets one in ~1 of 16k tokens.
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from blend.bench_serve import percentile
from blend.goodput import Targets, search


@dataclass(frozen=True)
class HttpBenchConfig:
    model: str = "random:mistral-7b-smol"
    device: str = "cuda"
    dtype: str = "bfloat16"
    pool: int = 24
    chunk_tokens: int = 512
    top_k: int = 6
    question_tokens: int = 64
    modes: tuple[str, ...] = ("blend",)
    outputs: tuple[int, ...] = (128,)
    ratio: float = 0.15
    requests: int = 200
    runs: int = 5
    burst: int = 64
    targets: Targets = field(default_factory=Targets)
    seed: int = 0
    serve_args: tuple[str, ...] = ()
    # The module that runs the server: api.cli (`ragblend serve`), or tests.serve_for_tests (the
    # same server with the hash embedder, where no embedding model is installed, as on the GPU
    # machine: retrieval then costs next to nothing).
    server_module: str = "api.cli"
    time_budget_s: float | None = None  # wall time for the whole run: the searches share what is left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Text of about `n_tokens` of the tokenizer's tokens: random words from its vocabulary."""
    vocab = [t.lstrip("Ġ") for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()]
    text, out = "", []
    while len(tokenizer.encode(text)) < n_tokens:
        out += rng.sample(vocab, 16)
        text = " ".join(out)
    while out and len(tokenizer.encode(text)) > n_tokens:
        out.pop()
        text = " ".join(out)
    return text


class Server:
    """`ragblend serve` in a child process, on a free port of the loopback."""

    def __init__(self, cfg: HttpBenchConfig, data_dir: Path, log):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        serve = ["serve"] if cfg.server_module == "api.cli" else []
        cmd = [sys.executable, "-m", cfg.server_module, *serve, "--model", cfg.model, "--device", cfg.device,
               "--dtype", cfg.dtype, "--data-dir", str(data_dir), "--port", str(self.port),
               "--chunk-tokens", str(cfg.chunk_tokens), "--max-tokens", str(max(cfg.outputs)),
               "--max-queue", str(max(cfg.requests, cfg.burst) + 8), "--log-level", "warning", *cfg.serve_args]
        log("starting: " + " ".join(cmd[1:]))
        self.proc = subprocess.Popen(cmd)

    def wait_healthy(self, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ragblend serve exited with {self.proc.returncode}")
            try:
                r = httpx.get(f"{self.base}/health", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def index_pool(base: str, texts: list[str]) -> None:
    with httpx.Client(base_url=base, timeout=600) as http:
        body = "\n".join(json.dumps({"id": f"doc-{i}", "text": t}) for i, t in enumerate(texts)) + "\n"
        r = http.post("/v1/documents", files={"file": ("pool.jsonl", body.encode())})
        r.raise_for_status()
        job = r.json()["job_id"]
        while (state := http.get(f"/v1/jobs/{job}").json())["status"] in ("queued", "running"):
            time.sleep(0.2)
        if state["status"] != "succeeded":
            raise RuntimeError(f"indexing the pool failed: {state}")


async def one(client: httpx.AsyncClient, body: dict, delay: float, rows: list[dict]) -> None:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    first = done = None
    usage = {}
    async with client.stream("POST", "/v1/query", json=body) as r:
        if r.status_code != 200:
            rows.append({"error": r.status_code})
            await r.aread()
            return
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if event == "token" and first is None:
                    first = time.perf_counter()
            elif line.startswith("data: ") and event == "done":
                done = time.perf_counter()
                usage = json.loads(line[6:]).get("usage", {})
    n = usage.get("completion_tokens", 0)
    first = first or done
    rows.append({"ttft_ms": (first - t0) * 1e3, "tpot_ms": (done - first) * 1e3 / max(1, n - 1), "tokens": n})


async def run_rate(base: str, questions: list[str], mode: str, ratio: float, top_k: int, out: int, rate: float,
                   requests: int, seed: int) -> dict:
    rng = random.Random(f"{seed}:{rate}")
    delays, t = [], 0.0
    for _ in range(requests):
        delays.append(t)
        t += rng.expovariate(rate)
    rows: list[dict] = []
    limits = httpx.Limits(max_connections=requests + 8, max_keepalive_connections=requests + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, {"question": questions[i % len(questions)], "top_k": top_k, "mode": mode,
                                            "ratio": ratio, "max_tokens": out, "stream": True}, d, rows)
                               for i, d in enumerate(delays)))
        span = time.perf_counter() - t0
    ok = [r for r in rows if "error" not in r]
    ttft, tpot = [r["ttft_ms"] for r in ok], [r["tpot_ms"] for r in ok]
    return {"mode": mode, "rate": rate, "output_tokens": out, "requests": len(ok), "errors": len(rows) - len(ok),
            "seconds": span, "req_per_s": len(ok) / span, "tokens_per_s": sum(r["tokens"] for r in ok) / span,
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
            "tpot_p50_ms": percentile(tpot, 0.5), "tpot_p99_ms": percentile(tpot, 0.99)}


def search_cell(base: str, questions: list[str], cfg: HttpBenchConfig, mode: str, out: int,
                deadline: float | None, log) -> dict:
    """The goodput of one (mode, output length) over HTTP, within `deadline` (None: no bound)."""
    def run(rate: float, n: int = cfg.requests) -> dict:
        row = asyncio.run(run_rate(base, questions, mode, cfg.ratio, cfg.top_k, out, rate, n, cfg.seed))
        log(f"  HTTP {mode} {out} tokens, rate {rate:.2f}/s: {row['req_per_s']:.2f} req/s, TTFT p99 "
            f"{row['ttft_p99_ms']:.0f} ms, TPOT p50/p99 {row['tpot_p50_ms']:.1f}/{row['tpot_p99_ms']:.1f} ms"
            f", {row['errors']} errors, {row['seconds']:.1f} s")
        return row
    run(1000.0, 4)  # untimed: the first requests (prefill graphs, compilation)
    burst = run(1e6, cfg.burst)

    def affordable(rate: float) -> bool:  # served no faster than saturation, then about the burst's drain
        need = cfg.requests / min(rate, burst["req_per_s"]) + burst["seconds"] / 2
        return deadline is None or time.perf_counter() + need <= deadline
    found = search(run, burst["req_per_s"], cfg.targets, cfg.runs, affordable=affordable)
    at = next((r for r in found.runs if r["met"] and r["rate"] == found.rate), None)
    log(f"HTTP {mode}, {out} output tokens: goodput {found.rate:.2f} req/s (saturation {burst['req_per_s']:.2f})")
    return {"mode": mode, "output_tokens": out, "goodput": found.rate, "failed_at": found.failed_at,
            "saturation": burst["req_per_s"], "at_goodput": at, "runs": found.runs}


def run_http_bench(cfg: HttpBenchConfig, data_dir: Path, log=print) -> dict:
    from transformers import AutoTokenizer

    from blend.loader import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    rng = random.Random(cfg.seed)
    # a little under the chunk size: the chunker counts the chunk's separator too
    texts = [words(tokenizer, cfg.chunk_tokens - 16, rng) for _ in range(cfg.pool)]
    questions = [words(tokenizer, cfg.question_tokens, rng) + "?" for _ in range(64)]
    t_start = time.perf_counter()
    server = Server(cfg, data_dir, log)
    result: dict = {"config": {**cfg.__dict__, "targets": cfg.targets.__dict__}, "goodput": []}
    try:
        t = time.time()
        result["health"] = server.wait_healthy()
        log(f"healthy after {time.time() - t:.0f} s: max batch {result['health']['max_batch']}")
        index_pool(server.base, texts)
        cells = [(out, mode) for out in cfg.outputs for mode in cfg.modes]
        for i, (out, mode) in enumerate(cells):
            deadline = None
            if cfg.time_budget_s is not None:  # an equal share of what is left for each search to come
                deadline = time.perf_counter() + (t_start + cfg.time_budget_s - time.perf_counter()) / (len(cells) - i)
            result["goodput"].append(search_cell(server.base, questions, cfg, mode, out, deadline, log))
    finally:
        server.stop()
    return result
