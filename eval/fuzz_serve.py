r"""Seeded fuzz of a running `ragblend serve` (issue 23, Show 2): requests mixing malformed and
extreme sampling values (and other hostile fields) are sent concurrently, so that the valid ones
decode together in the batched step while the invalid ones arrive beside them. Then every
well-formed request is sent again alone, and its answer must equal the one it got in the crowd.
Prints one table and writes one JSON; exits 1 on any 5xx or mismatch.

    python -m api.cli index samples/corpus --data-dir .data/fuzz --model random:tiny-smol --chunk-tokens 64
    python -m api.cli serve --data-dir .data/fuzz --model random:tiny-smol --log-level warning &
    python -m eval.fuzz_serve --url http://127.0.0.1:8000 --n 300 --seed 0 --out out/fuzz.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUESTIONS = ["Who designed the Halvard Bridge?", "Where was Mira Solberg born?", "How long is the Lenna River?",
             "How many people live in Ostmark?", "What is Kettavik known for?"]
ROUTES = ("/v1/query", "/v1/chat/completions", "/v1/completions")
# Values the sampler cannot use, and other bodies that must be refused with a 4xx.
BAD_SAMPLING = [("temperature", "1e-37"), ("temperature", "5e-324"), ("temperature", "-1"), ("temperature", "1e999"),
                ("temperature", '"NaN"'), ("temperature", "1e-4"), ("temperature", "2.5"), ("top_p", "0"),
                ("top_p", "1e-300"), ("top_p", "7e-46"), ("top_p", "1.5"), ("top_p", "-0.0"),
                ("seed", "-1"), ("seed", "1e3"), ("max_tokens", "0"), ("max_tokens", "999999999")]
BAD_TEXT = ['"\\ud800 bridge"', '"bridge \\udfff"']
# Extreme but valid: these reach the batch.
EDGE_SAMPLING = [{"temperature": 0.001}, {"temperature": 2.0}, {"top_p": 1e-6}, {"temperature": 1.0, "top_p": 1e-6},
                 {"temperature": 0.7, "top_p": 0.9}, {"temperature": 2.0, "top_p": 1.0}, {}]


def body_text(route: str, question_json: str, fields: dict[str, str]) -> str:
    """A JSON body as text (so that values JSON libraries will not write, such as 1e999, can be sent)."""
    key = {"/v1/query": "question", "/v1/completions": "prompt"}.get(route)
    head = f'"{key}": {question_json}' if key else f'"messages": [{{"role": "user", "content": {question_json}}}]'
    return "{" + ", ".join([head, *(f'"{k}": {v}' for k, v in fields.items())]) + "}"


def make_requests(n: int, seed: int, max_tokens: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        route = rng.choice(ROUTES)
        fields = {"max_tokens": str(rng.randint(1, max_tokens)), "top_k": str(rng.randint(1, 4))}
        kind = rng.random()
        if kind < 0.35:
            name, value = rng.choice(BAD_SAMPLING)
            fields[name] = value
            question, good = json.dumps(rng.choice(QUESTIONS)), False
        elif kind < 0.45:
            question, good = rng.choice(BAD_TEXT), False
        else:
            edge = rng.choice(EDGE_SAMPLING)
            fields.update({k: json.dumps(v) for k, v in edge.items()})
            if edge.get("temperature"):
                fields["seed"] = str(rng.randint(0, 2**31))  # seeded: its answer is reproducible alone
            question, good = json.dumps(rng.choice(QUESTIONS)), True
        out.append({"i": i, "route": route, "body": body_text(route, question, fields), "good": good})
    return out


def answer_of(route: str, data: dict) -> str:
    if route == "/v1/query":
        return data["answer"]
    choice = data["choices"][0]
    return choice["message"]["content"] if route == "/v1/chat/completions" else choice["text"]


def send(client: httpx.Client, req: dict) -> tuple[int, str | None, float]:
    t0 = time.monotonic()
    for _ in range(20):  # a full queue (503 + Retry-After) is retried as a polite client would
        r = client.post(req["route"], content=req["body"].encode(), headers={"content-type": "application/json"})
        if r.status_code == 503 and "retry-after" in r.headers:
            time.sleep(min(2.0, float(r.headers["retry-after"])))
            continue
        break
    text = answer_of(req["route"], r.json()) if r.status_code == 200 else None
    return r.status_code, text, time.monotonic() - t0


def batch_steps(client: httpx.Client) -> tuple[float, float]:
    """(sequences decoded, decode steps) so far, from the server's /metrics."""
    got = {"sum": 0.0, "count": 0.0}
    r = client.get("/metrics")
    for line in r.text.splitlines() if r.status_code == 200 else []:
        for k in got:
            if line.startswith(f"ragblend_decode_batch_size_{k} "):
                got[k] = float(line.split()[-1])
    return got["sum"], got["count"]


def run(url: str, n: int, seed: int, concurrency: int, max_tokens: int, api_key: str | None = None) -> dict:
    reqs = make_requests(n, seed, max_tokens)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=300, headers=headers) as client:
        seqs0, steps0 = batch_steps(client)
        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            crowd = list(pool.map(lambda r: send(client, r), reqs))
        crowd_s = time.monotonic() - t0
        seqs1, steps1 = batch_steps(client)
        alone = {r["i"]: send(client, r) for r, (status, _, _) in zip(reqs, crowd) if r["good"] and status == 200}
    statuses = Counter(status for status, _, _ in crowd)
    mismatched = [r["i"] for r in reqs if r["i"] in alone and alone[r["i"]][1] != crowd[r["i"]][1]]
    bad_accepted = [r["i"] for r, (status, _, _) in zip(reqs, crowd) if not r["good"] and status < 400]
    good_refused = [r["i"] for r, (status, _, _) in zip(reqs, crowd) if r["good"] and status != 200]
    return {"requests": n, "seed": seed, "concurrency": concurrency, "well_formed": sum(r["good"] for r in reqs),
            "statuses": dict(sorted(statuses.items())), "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
            "compared_alone": len(alone), "mismatched": mismatched, "malformed_accepted": bad_accepted,
            "well_formed_refused": good_refused, "crowd_seconds": round(crowd_s, 2),
            "mean_decode_batch": round((seqs1 - seqs0) / max(1.0, steps1 - steps0), 2),
            "examples_refused": {r["body"][:90]: crowd[r["i"]][0] for r in reqs if not r["good"]} if n <= 60 else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--api-key")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = run(a.url, a.n, a.seed, a.concurrency, a.max_tokens, a.api_key)
    rows = [("requests (well-formed)", f"{res['requests']} ({res['well_formed']})"),
            ("statuses", " ".join(f"{k}×{v}" for k, v in res["statuses"].items())),
            ("5xx (must be 0)", res["server_errors_5xx"]),
            ("answers compared alone", res["compared_alone"]),
            ("mismatched (must be 0)", len(res["mismatched"])),
            ("malformed accepted (must be 0)", len(res["malformed_accepted"])),
            ("well-formed refused (must be 0)", len(res["well_formed_refused"])),
            ("crowd phase", f"{res['crowd_seconds']} s, mean decode batch {res['mean_decode_batch']}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    ok = not (res["server_errors_5xx"] or res["mismatched"] or res["malformed_accepted"] or res["well_formed_refused"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
