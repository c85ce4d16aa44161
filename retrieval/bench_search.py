"""Search latency and HNSW recall over random unit vectors; prints one table, writes one JSON.

    python -m retrieval.bench_search --n 10000,100000 --dim 384 --queries 200 --out out/search.json

Latency is per single query (the serving case: one question at a time), median over
`--queries`. Recall@k is HNSW's top-k against the exact flat top-k for the same queries; one
HNSW graph per n is searched at each `--ef-search` value.
Random Gaussian vectors have no cluster structure, so they are a hard case for HNSW: real
embeddings usually reach higher recall at the same efSearch.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import faiss
import numpy as np
import typer

from .index import VectorIndex


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered_vectors(n: int, n_queries: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Closer to text embeddings than uniform noise: topics (clusters) of similar vectors, and
    queries that lie near some stored vector, as a question lies near its passage."""
    centroids = unit_vectors(max(1, n // 100), dim, rng)
    data = centroids[rng.integers(0, len(centroids), n)] + rng.standard_normal((n, dim), dtype=np.float32) * (0.8 / dim ** 0.5)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[rng.integers(0, n, n_queries)] + rng.standard_normal((n_queries, dim), dtype=np.float32) * (0.5 / dim ** 0.5)
    return data, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def time_queries(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Search one query at a time; returns the ids and the per-query latencies in ms."""
    ids, latencies = [], []
    for q in queries:
        t = time.perf_counter()
        _, found = index.search(q[None, :], k)
        latencies.append((time.perf_counter() - t) * 1e3)
        ids.append(found[0])
    return np.stack(ids), latencies


def bench(n: int, dim: int, n_queries: int, k: int, ef_values: list[int], seed: int,
          data_kind: str = "uniform") -> list[dict]:
    """Flat once, then one HNSW graph searched at each efSearch in `ef_values`."""
    rng = np.random.default_rng(seed)
    if data_kind == "clustered":
        data, queries = clustered_vectors(n, n_queries, dim, rng)
    else:
        data, queries = unit_vectors(n, dim, rng), unit_vectors(n_queries, dim, rng)
    rows, truth = [], None
    for kind in ("flat", "hnsw"):
        index = VectorIndex(dim, kind)
        t = time.perf_counter()
        index.add(np.arange(n, dtype=np.int64), data)
        build_s = time.perf_counter() - t
        for ef in ([None] if kind == "flat" else ef_values):
            if ef is not None:
                index.ef_search = ef
            time_queries(index, queries[: min(10, n_queries)], k)  # warm-up
            ids, lat = time_queries(index, queries, k)
            if kind == "flat":
                truth = ids
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))
            rows.append({"kind": kind, "n": n, "dim": dim, "k": k, "ef_search": ef,
                         "data": data_kind, "build_s": round(build_s, 3), "median_ms": round(float(np.median(lat)), 4),
                         "p95_ms": round(float(np.percentile(lat, 95)), 4), "recall": round(recall, 4)})
    return rows


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(help=__doc__.split("\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
def main(
    n: Annotated[str, typer.Option(help="comma-separated corpus sizes")] = "10000,100000",
    dim: int = 384,
    queries: int = 200,
    k: int = 10,
    ef_search: Annotated[str, typer.Option(help="comma-separated HNSW efSearch values")] = "64",
    seed: int = 0,
    data: Annotated[Literal["uniform", "clustered"], typer.Option(
        help="uniform random unit vectors (HNSW's worst case) or clustered, query-near-a-document")] = "uniform",
    out: Annotated[Optional[Path], typer.Option(help="write the results as JSON here")] = None,
) -> None:
    rows = []
    for size in (int(x) for x in n.split(",") if x):
        rows += bench(size, dim, queries, k, [int(x) for x in ef_search.split(",")], seed, data)

    header = (f"{'kind':<5} {'n':>8} {'dim':>4} {'ef':>5} {'build s':>8} {'median ms':>10} {'p95 ms':>8} "
              f"{f'recall@{k}':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ef = "-" if r["ef_search"] is None else r["ef_search"]
        print(f"{r['kind']:<5} {r['n']:>8} {r['dim']:>4} {ef:>5} {r['build_s']:>8.2f} {r['median_ms']:>10.3f} "
              f"{r['p95_ms']:>8.3f} {r['recall']:>10.3f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        args = {"n": n, "dim": dim, "queries": queries, "k": k, "ef_search": ef_search, "seed": seed, "data": data,
                "out": out}
        env = {"faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(),
               "machine": platform.machine(), "python": platform.python_version()}
        out.write_text(json.dumps({"args": {key: str(v) for key, v in args.items()}, "env": env,
                                   "results": rows}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    app()
