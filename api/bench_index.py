"""Indexing and KV-store figures on CPU: `python -m api.bench_index PATH --data-dir D`.

Prints indexing throughput, stored bytes per token against 2·L·H_kv·D·sizeof(dtype), and the time
to load one chunk's KV from LMDB (page cache; checksums verified) and from the hot tier.
`--neighbours N --upload FILE`: the index gets neighbour-aware KV (as `ragblend index --neighbours
N`), then FILE is indexed as an API upload's job does it (its documents, then its neighbour step),
timed in two parts.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from api.datadir import DEFAULT_NEIGHBOURS


def _timed_pass(keys: list[str], read) -> list[float]:
    times = []
    for k in keys:
        t = time.perf_counter()
        read(k)
        times.append((time.perf_counter() - t) * 1e3)
    return times


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown")


@app.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
def main(
    paths: Annotated[list[Path], typer.Argument(help="files or directories to index (.txt, .md, .jsonl)")],
    data_dir: Annotated[Path, typer.Option(help="index + KV store directory")],
    model: str = "default",
    chunk_tokens: int = 256,
    out: Annotated[Optional[Path], typer.Option(help="write the figures as JSON here")] = None,
    neighbours: Annotated[int, typer.Option(min=0, max=2, help="--neighbours N for the index, as `ragblend index` "
                                            "gives a new data dir by default (0: off)")] = DEFAULT_NEIGHBOURS,
    upload: Annotated[Optional[Path], typer.Option(help="then index this file as an API upload's job, timed")] = None,
) -> None:
    # Imported here so that --help answers at once, without loading torch and the model stack.
    from api.service import RagService
    from blend.engine import Engine
    from blend.loader import load_model
    from retrieval import load_path
    from store import StagedReader
    from store.quant import bytes_per_token, kv_format

    svc = RagService(data_dir, engine=Engine(load_model(model)), chunk_tokens=chunk_tokens)
    docs = [d for p in paths for d in load_path(p)]
    t0 = time.perf_counter()
    with svc.corpus.bulk():
        report = svc.index_documents(docs)
    report.seconds = time.perf_counter() - t0
    idx = report.as_dict()
    uploaded = None
    if neighbours or upload:
        from api.datadir import record_index
        from api.neighbour_index import build
        from api.service import IndexReport

        t0 = time.perf_counter()
        idx["neighbour_build"] = {**build(svc, neighbours), "seconds": round(time.perf_counter() - t0, 3)}
        record_index(svc.data_dir, neighbours=neighbours)
        svc.load_neighbours()
    if upload:
        job = IndexReport()  # what api/indexer.py's job runs, in its order
        t0 = time.perf_counter()
        for doc in load_path(upload):
            svc.index_document(doc, job)
        t1 = time.perf_counter()
        svc.index_neighbours(job)
        t2 = time.perf_counter()
        uploaded = {**job.as_dict(), "documents_s": round(t1 - t0, 3), "neighbour_step_s": round(t2 - t1, 3)}
    p = svc.engine.parts
    keys = list(svc.store.keys())
    tokens = {k: svc.store.get_meta(k)["n_tokens"] for k in keys}
    stats = svc.store.stats()
    # the payload the store's format needs (int8 by default: values and their scales), against
    # what was stored: the rest is the entries' headers
    fmt = kv_format(svc.store.kv_format or p.dtype)
    mean_tokens = statistics.mean(tokens.values())
    theory = round(sum(bytes_per_token(fmt, p.n_layers, p.n_kv_heads, p.head_dim, n) * n for n in tokens.values())
                   / sum(tokens.values()), 1)
    per_token = stats["kv_bytes"] / sum(tokens.values())
    fp = svc.engine.fingerprint
    # Each read path twice over all chunks: the first pass may fault pages in from disk, the
    # second reads from the page cache (what a serving process sees for a hot corpus).
    reader = StagedReader(svc.store, pin=False)
    get_first = _timed_pass(keys, lambda k: svc.store.get(k, fingerprint=fp))
    get_warm = _timed_pass(keys, lambda k: svc.store.get(k, fingerprint=fp))
    staged = _timed_pass(keys, lambda k: reader.read(k, fp))
    reader.close()
    for k in keys:
        svc.kv.gpu.put(k, svc.store.get(k, fingerprint=fp))
    hot = _timed_pass(keys, svc.kv.gpu.get)
    result = {
        "model": model, "chunk_tokens": chunk_tokens, "indexing": idx,
        "bytes_per_token": round(per_token, 1), "theoretical_bytes_per_token": theory,
        "overhead": round(per_token / theory - 1, 5),
        "mean_chunk_tokens": round(mean_tokens, 1), "kv_format": fmt.name,
        "lmdb_first_read_ms_median": round(statistics.median(get_first), 3),
        "lmdb_load_ms_median": round(statistics.median(get_warm), 3),
        "lmdb_staged_parallel_load_ms_median": round(statistics.median(staged), 3),
        "hot_load_ms_median": round(statistics.median(hot), 5),
        "chunk_kv_bytes_mean": int(stats["kv_bytes"] / len(keys)),
        "neighbours": neighbours, "upload": uploaded,
    }
    print(f"indexed {idx['documents']} documents, {idx['chunks']} chunks, {idx['tokens']} tokens in "
          f"{idx['seconds']:.1f} s: {idx['chunks_per_s']:.2f} chunks/s, {idx['tokens_per_s']:.0f} tokens/s "
          f"(KV computed: {idx['kv_computed']})")
    print(f"stored {per_token:.1f} bytes/token vs the {fmt.name} payload of L·2·H·D = {p.n_layers}·2·{p.n_kv_heads}·"
          f"{p.head_dim} values with their scales, {theory} (+{100 * result['overhead']:.3f}% header)")
    print(f"load one chunk KV ({result['mean_chunk_tokens']} tokens avg): LMDB {result['lmdb_load_ms_median']:.3f} ms"
          f" median from the page cache (first pass {result['lmdb_first_read_ms_median']:.3f} ms) ({result['lmdb_staged_parallel_load_ms_median']:.3f} ms with the parallel staged reader),"
          f" hot tier {result['hot_load_ms_median']:.4f} ms median")
    if uploaded:
        print(f"upload of {upload} (--neighbours {neighbours}): {uploaded['chunks']} chunks, {uploaded['tokens']} tokens; "
              f"documents {uploaded['documents_s']:.2f} s, neighbour step {uploaded['neighbour_step_s']:.2f} s "
              f"({uploaded['neighbour_kv_computed']} neighbour-aware entries computed)")
    if out:
        out.write_text(json.dumps(result, indent=2))
    svc.close()


if __name__ == "__main__":
    app()
