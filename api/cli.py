"""The `ragblend` command line."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from api.cli_common import (CheckLayersOpt, DeviationOpt, DeviceOpt, DtypeOpt, ModelOpt, SelectionOpt, ThreadsOpt, check_layers_of, fail,
                            load_engine, selection_of, set_threads, unit_floats)
from blend.spec import DEFAULT_CHECK_LAYER, DEFAULT_MAX_TOKENS, DEFAULT_RATIO, Mode

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RAG serving with CacheBlend: reuse precomputed chunk KV caches.")

ModeOpt = Annotated[str, typer.Option(help="prefill mode: full, prefix, reuse or blend")]
Ratio = Annotated[float, typer.Option(min=0.0, max=1.0, help="blend: share of chunk tokens recomputed")]
DataDirOpt = Annotated[Optional[Path], typer.Option(help="index + KV store directory (default: $RAGBLEND_DATA or ~/.local/share/ragblend)")]
KvStoreOpt = Annotated[Optional[str], typer.Option(
    "--kv-store", envvar="RAGBLEND_KV_STORE", help="a chunk-KV tier shared by every replica: redis://[user:password@]"
    "host:port/db, rediss://… (TLS) (env RAGBLEND_KV_STORE); the data dir's LMDB is then its local cache. "
    "Default: the data dir's LMDB alone")]


def _service(data_dir: Optional[Path], model: str, device: str, dtype: str, must_exist: bool = False,
             **kwargs):
    from api.service import RagService, default_data_dir

    path = data_dir or default_data_dir()
    if must_exist and not (path / "corpus").exists():
        fail(f"no index in {path}: run `ragblend index PATH --data-dir {path}` first")
    import shutil

    from api.datadir import bind_model, check_embedder, check_model, record_index, settle_chunk_tokens

    engine = load_engine(model, device, dtype)
    if engine.tokenizer is None:
        fail(f"model {model!r} has no tokenizer, which indexing and answering need "
             "(random:<shape> models have none, except the *-smol shapes)")
    created = not path.exists()
    rechunk = kwargs.pop("rechunk", False)
    try:
        check_model(path, engine.name, engine.fingerprint)
        # index settings (api/datadir.py): the recorded chunk size unless one is asked for
        kwargs["chunk_tokens"] = settle_chunk_tokens(path, kwargs.get("chunk_tokens"), rechunk)
        service = RagService(path, engine=engine, **kwargs)
        try:
            check_embedder(path, service.corpus.embedder.name)
        except ValueError:
            service.close()
            raise
        bind_model(path, engine.name, engine.fingerprint)
        record_index(path, chunk_tokens=service.chunk_tokens, embedder=service.corpus.embedder.name,
                     model=engine.name)
        return service
    except (ValueError, OSError) as e:  # ModelMismatch is a ValueError
        if created:  # refused: leave nothing behind
            shutil.rmtree(path, ignore_errors=True)
        fail(str(e))


@app.command()
def index(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="files or directories: PDF, HTML, DOCX, reStructuredText, "
                                                     "JSONL and plain text of any extension")],
    data_dir: DataDirOpt = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    chunk_tokens: Annotated[Optional[int], typer.Option(min=16, max=4096, help="chunk size in LLM tokens (recorded in "
                                                         "the data dir; default: the recorded one, else 384)")] = None,
    rechunk: Annotated[bool, typer.Option("--rechunk", help="accept a --chunk-tokens other than the recorded one: "
                                                            "documents indexed from now on are re-chunked")] = False,
    keep_missing: Annotated[bool, typer.Option("--keep-missing", help="keep documents whose files are gone from "
                                                                      "the given directories (dropped by default)")] = False,
    index_kind: Annotated[str, typer.Option(help="flat (exact) or hnsw (approximate, large corpora)")] = "flat",
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
    threads: ThreadsOpt = None,
    kv_dtype: Annotated[Optional[str], typer.Option(help="stored chunk-KV format: int8, fp8, bfloat16, float16 or float32 "
                                                         "(recorded in the data dir; default for a new one: int8)")] = None,
    max_store_gb: Annotated[Optional[float], typer.Option(help="cap on the KV store in GB (recorded; 0 removes it): past it "
                                                               "the least recently used chunk KV is evicted")] = None,
    allow_eviction: Annotated[bool, typer.Option("--allow-eviction", help="index even if the new chunks exceed "
                                                                          "--max-store-gb, evicting older chunk KV")] = False,
    kv_store: KvStoreOpt = None,
) -> None:
    """Chunk, embed and index documents, and precompute every chunk's KV into the store.

    Document ids are each root's name and the path below it (`projA/README.md`), or a JSONL
    line's `id`. An id that already names a different document (from another file, or added
    through the API) is refused and reported, never overwritten; the exit code is then 1."""
    from api.progress import TokenProgress
    from retrieval.loaders import collect_skips, load_roots

    for p in paths:
        if not p.exists():
            fail(f"no such file or directory: {p}")
    if index_kind not in ("flat", "hnsw"):
        fail("--index-kind must be flat or hnsw")
    set_threads(threads)
    with collect_skips() as skipped:
        docs = list(load_roots(paths))
    if not docs:
        if as_json:
            typer.echo(json.dumps({"documents": 0, "skipped": skipped}, ensure_ascii=False))
        else:
            _echo_skipped(skipped)
        fail(f"no documents in {', '.join(map(str, paths))}: "
             + (f"nothing indexed, {len(skipped)} skipped (listed above)" if skipped else "no files"))
    service = _service(data_dir, model, device, dtype, chunk_tokens=chunk_tokens, rechunk=rechunk,
                       index_kind=index_kind, kv_store=kv_store,
                       embedder=(ctx.obj or {}).get("embedder"))  # handed in by tests/cli_for_tests.py
    # Documents of the given directories whose files are gone (or whose JSONL lines are) go first.
    removed = [] if keep_missing else service.prune(paths, docs)
    docs, collisions = service.corpus.collisions(docs)
    for c in collisions:
        typer.echo(f"error: {c['source']}: the id {c['id']!r} is taken by {c['taken_by']}; not indexed", err=True)
    from api.index_plan import apply_store_settings, plan_index
    try:
        apply_store_settings(service, kv_dtype, max_store_gb)
        plan = plan_index(service, docs)
    except ValueError as e:
        service.close()
        fail(str(e))
    typer.echo(plan.describe(), err=True)
    if (refusal := plan.refusal(allow_eviction)) is not None:
        service.close()
        fail(refusal)
    bar = TokenProgress(plan.changed_tokens, "indexing")
    try:
        with service.corpus.bulk():
            report = service.index_documents(docs, bar.update)
    finally:
        bar.close()
        usage = service.store.usage()  # what the cap counts, after: set beside the estimate
        service.close()
    report.skipped = skipped
    summary = {**report.as_dict(), "removed": removed, "collisions": collisions, "estimate": plan.as_dict(),
               "store": {**usage, "grew_bytes": usage["bytes"] - plan.store_bytes}}
    typer.echo(f"store: {summary['store']['grew_bytes'] / 1e9:.4g} GB written (estimated "
               f"{plan.estimated_bytes / 1e9:.4g} GB), {usage['bytes'] / 1e9:.4g} GB held, "
               f"{usage['evictions']} evictions in all", err=True)
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
    else:
        typer.echo(f"{summary['documents']} documents ({summary['unchanged']} unchanged), {summary['chunks']} chunks, "
                   f"{summary['kv_computed']} KVs computed in {summary['seconds']:.1f} s "
                   f"({summary['tokens_per_s'] or 0:.0f} tokens/s) → {service.data_dir}"
                   + (f"; {len(removed)} removed (files gone)" if removed else "")
                   + (f"; {len(collisions)} refused (id taken)" if collisions else ""))
        _echo_skipped(skipped)
    if collisions:
        raise typer.Exit(1)


def _echo_skipped(skipped: list[dict]) -> None:
    """The files (and JSONL lines) not indexed, each with its reason, after the summary."""
    if skipped:
        typer.echo(f"skipped {len(skipped)}:")
    for s in skipped:
        typer.echo(f"  {s['path']}" + (f" line {s['line']}" if "line" in s else "") + f": {s['reason']}")


store_app = typer.Typer(help="the chunk-KV store", no_args_is_help=True)
docs_app = typer.Typer(help="indexed documents", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(docs_app, name="docs")


def _open_readonly(data_dir: Optional[Path]):
    from api.service import default_data_dir
    from retrieval.registry import Registry
    from store import KVStore

    path = data_dir or default_data_dir()
    if not (path / "kv").exists():
        fail(f"no index in {path}")
    return path, KVStore(path / "kv", readonly=True), Registry(path / "corpus" / "registry.sqlite")


@store_app.command("stats")
def store_stats(data_dir: DataDirOpt = None, kv_store: KvStoreOpt = None) -> None:
    """Entries and bytes in the KV store, and what the registry references. With --kv-store: the
    local cache's and the shared tier's (what this registry references there, and what it does not)."""
    if kv_store:
        from api.service import default_data_dir
        from api.shared_store import stats as shared_stats

        path = data_dir or default_data_dir()
        if not (path / "kv").exists():
            fail(f"no index in {path}")
        try:
            typer.echo(json.dumps(shared_stats(path, kv_store), indent=2))
        except (ValueError, OSError) as e:
            fail(str(e))
        return
    path, kv, registry = _open_readonly(data_dir)
    stats = kv.stats()
    in_use = registry.kv_keys_in_use()
    stored = set(kv.keys())
    stats.update(documents=len(registry.list_documents()), chunks=registry.count_chunks(),
                 referenced_keys=len(in_use), unreferenced_entries=len(stored - in_use),
                 missing_entries=len(in_use - stored), path=str(stats["path"]))
    typer.echo(json.dumps(stats, indent=2))


@store_app.command("gc")
def store_gc(data_dir: DataDirOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
             kv_store: KvStoreOpt = None,
             shared: Annotated[bool, typer.Option("--shared", help="with --kv-store: also delete shared entries that "
                                                  "no given registry (--data-dir and each --replica) references")] = False,
             replica: Annotated[Optional[list[Path]], typer.Option(help="with --shared: another replica's data dir, "
                                                                   "whose registry counts as referencing")] = None) -> None:
    """Delete KV entries no indexed chunk references (left by a crash between the KV write and the
    registry commit). Safe beside a running indexer: a chunk whose KV went missing is recomputed
    when queried. With --kv-store: the local cache's, and on the shared tier only with --shared
    (other replicas may reference what this registry does not)."""
    from api.service import default_data_dir
    from retrieval.registry import Registry
    from store import KVStore

    path = data_dir or default_data_dir()
    if not (path / "kv").exists():
        fail(f"no index in {path}")
    if (shared or replica) and not kv_store:
        fail("--shared and --replica need --kv-store (the shared tier)")
    if kv_store:
        from api.shared_store import gc as shared_gc
        try:
            summary = shared_gc(path, kv_store, shared, list(replica or []))
        except (ValueError, OSError) as e:
            fail(str(e))
        typer.echo(json.dumps(summary) if as_json else
                   f"removed {summary['removed']} unreferenced local KV entries, {summary['remaining']} remain; "
                   f"shared tier: {summary['shared_removed']} removed, {summary['shared_unreferenced']} referenced "
                   f"by no registry given, {summary['shared_remaining']} remain" +
                   (f"\n{summary['note']}" if "note" in summary else ""))
        return
    store = KVStore(path / "kv")
    unreferenced = sorted(set(store.keys()) - Registry(path / "corpus" / "registry.sqlite").kv_keys_in_use())
    removed = store.delete_many(unreferenced) if unreferenced else 0
    summary = {"removed": removed, "remaining": len(store)}
    typer.echo(json.dumps(summary) if as_json else f"removed {removed} unreferenced KV entries, {len(store)} remain")


@docs_app.command("list")
def docs_list(data_dir: DataDirOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List indexed documents."""
    _, _, registry = _open_readonly(data_dir)
    docs = registry.list_documents()
    if as_json:
        typer.echo(json.dumps(docs, default=str))
        return
    for d in docs:
        typer.echo(f"{d['doc_id']}\t{d['n_chunks']} chunks")


@docs_app.command("delete")
def docs_delete(doc_id: Annotated[str, typer.Argument(help="the document id (for files: path relative to the indexed root)")],
                data_dir: DataDirOpt = None) -> None:
    """Remove a document: its vectors, registry rows and KV entries."""
    from api.service import default_data_dir, remove_document
    from retrieval import Corpus, Embedder
    from store import KVStore

    path = data_dir or default_data_dir()
    if not (path / "corpus").exists():
        fail(f"no index in {path}")
    removed = remove_document(Corpus(path / "corpus", Embedder()), doc_id, KVStore(path / "kv").delete_many)
    if removed is None:
        fail(f"no document {doc_id!r}", code=1)
    typer.echo(f"deleted {doc_id} ({removed} KV entries removed)")


@app.command()
def ask(
    ctx: typer.Context,
    question_arg: Annotated[Optional[str], typer.Argument(metavar="QUESTION", help="the question")] = None,
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="the question")] = None,
    chunks: Annotated[Optional[Path], typer.Option(help="JSONL ({\"text\"} a line) or blank-line separated chunks; skips retrieval")] = None,
    mode: ModeOpt = Mode.BLEND.value,
    ratio: Ratio = DEFAULT_RATIO,
    check_layer: Annotated[int, typer.Option(min=0, help="blend: the layer where tokens are selected")] = DEFAULT_CHECK_LAYER,
    check_layers: CheckLayersOpt = None,
    selection: SelectionOpt = None,
    deviation: DeviationOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = DEFAULT_MAX_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Optional[int] = None,
    top_k: Annotated[int, typer.Option(min=1, max=64, help="chunks to retrieve")] = 6,
    data_dir: DataDirOpt = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    threads: ThreadsOpt = None,
    kv_store: KvStoreOpt = None,
) -> None:
    """Answer a question from the given chunks (--chunks) or from an indexed corpus."""
    from blend.spec import BadQuery, BlendConfig, QuerySpec, Sampling
    from retrieval.rules import text_problem

    q = question or question_arg
    if not q or not q.strip():
        fail("a question is needed (QUESTION or --question)")
    if problem := text_problem(q):  # bytes that are not UTF-8 arrive as lone surrogates
        fail(f"the question {problem}")
    set_threads(threads)
    try:
        spec = QuerySpec(mode, BlendConfig.with_checks(check_layers_of(check_layer, check_layers), ratio=ratio,
                                                       selection=selection_of(selection, deviation)),
                         Sampling(temperature, top_p, seed), max_tokens)
    except BadQuery as e:
        fail(f"--{e.field.replace('_', '-')}: {str(e).split(': ', 1)[1]}")
    hits = None
    if chunks is not None:
        from api.chunkfile import read_chunks
        try:
            texts = read_chunks(chunks)
        except ValueError as e:
            fail(str(e))
        engine = load_engine(model, device, dtype)
    else:
        service = _service(data_dir, model, device, dtype, must_exist=True, kv_store=kv_store,
                           embedder=(ctx.obj or {}).get("embedder"))  # handed in by tests/cli_for_tests.py
        engine = service.engine
        if len(service.corpus) == 0:
            fail(f"the index in {service.data_dir} is empty: run `ragblend index PATH` first")
        hits = service.retrieve(q, top_k).hits
        texts = [h.text for h in hits]
    try:
        gen = engine.generate(engine.layout(q, texts), spec) if hits is None else service.answer(q, hits, spec)
        if as_json:
            ans = gen.run()
        else:
            for piece in gen:
                typer.echo(piece, nl=False)
            typer.echo()
            ans = gen.result
    except BadQuery as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({
            "answer": ans.text, "mode": ans.mode, "ratio": ans.ratio, "selection": ans.selection,
            "ttft_ms": round(ans.ttft_ms, 3), "recomputed_tokens": ans.recomputed_tokens,
            "cached_tokens": ans.cached_tokens, "total_tokens": ans.total_tokens,
            "first_token_logprobs": ans.top_logprobs(engine.tokenizer, 20),
            **({} if hits is None else {"chunks": [
                {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": round(h.score, 5), "text": h.text}
                for h in hits]}),
        }, ensure_ascii=False))
    else:
        if hits:  # the sources, under the answer
            typer.echo("sources:")
            for i, h in enumerate(hits, 1):
                typer.echo(f"  [{i}] {h.doc_id}  chunk {h.chunk_id}  score {h.score:.4f}")
        how = "" if ans.ratio is None else f" r={ans.ratio:g} {ans.selection}"
        typer.echo(f"[{ans.mode}{how}] ttft {ans.ttft_ms:.1f} ms, "
                   f"{ans.recomputed_tokens}/{ans.chunk_tokens} chunk tokens recomputed, "
                   f"{ans.cached_tokens}/{ans.total_tokens} prompt tokens from cached KV", err=True)


@app.command()
def bench(
    shape: Annotated[str, typer.Option(help="tiny, mistral-7b, llama-3.1-8b, qwen2.5-7b")] = "tiny",
    random_weights: Annotated[bool, typer.Option("--random-weights/--no-random-weights", help="random weights of --shape; --no-random-weights times --model instead")] = True,
    model: Annotated[Optional[str], typer.Option("--model", help="with --no-random-weights: the model to time")] = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[Optional[str], typer.Option(help="default: bfloat16 on cuda, float32 on cpu")] = None,
    chunks: Annotated[int, typer.Option(min=1, max=256)] = 6,
    chunk_tokens: Annotated[int, typer.Option(min=1)] = 512,
    question_tokens: Annotated[int, typer.Option(min=1)] = 64,
    ratios: Annotated[str, typer.Option(help="blend ratios, comma-separated")] = "0.05,0.15,0.3",
    tiers: Annotated[str, typer.Option(help="where chunk KVs are read from: gpu (device memory), cpu, lmdb")] = "gpu,cpu,lmdb",
    sweep: Annotated[str, typer.Option(help="context lengths for the full vs blend sweep ('' to skip)")] = "1024,2048,4096,8192,16384",
    runs: Annotated[int, typer.Option(min=1)] = 10,
    warmup: Annotated[int, typer.Option(min=0)] = 3,
    check_layer: Annotated[int, typer.Option(min=0)] = DEFAULT_CHECK_LAYER,
    out: Annotated[Path, typer.Option(help="directory for bench.json, bench.md, sweep.png")] = Path("out/bench"),
    profile: Annotated[bool, typer.Option(help="also profile reuse and blend r=0.15 per tier (CUDA)")] = False,
    selections: Annotated[str, typer.Option(help="also time blend r=0.15 with each of these selections "
                                                 "(comma-separated; '' for none)")] = "",
    gradual: Annotated[Optional[str], typer.Option(help="with --selections: also time each with these check "
                                                        "layers (gradual filtering, e.g. 1,8)")] = None,
) -> None:
    """Measure TTFT of every mode × ratio × KV tier on random weights of a real model shape."""
    from blend.bench import BenchConfig, run_bench, write
    from blend.shapes import SHAPES

    if not random_weights and model is None:
        fail("--no-random-weights needs --model")
    if random_weights and shape not in SHAPES:
        fail(f"--shape must be one of {', '.join(SHAPES)}")
    tier_list = tuple(t.strip() for t in tiers.split(",") if t.strip())
    if not tier_list or any(t not in ("gpu", "cpu", "lmdb") for t in tier_list):
        fail("--tiers takes gpu, cpu, lmdb")
    if device == "cpu" and "gpu" in tier_list:
        tier_list = tuple(t for t in tier_list if t != "gpu") or ("cpu",)
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            fail("--device cuda asked for, but CUDA is not available")
    from blend.spec import SELECTIONS
    sel_list = tuple(x.strip() for x in selections.split(",") if x.strip())
    if bad := [x for x in sel_list if x not in SELECTIONS]:
        fail(f"--selections: unknown {bad[0]!r}; choose from {', '.join(SELECTIONS)}")
    gradual_layers = check_layers_of(check_layer, gradual) if gradual else ()
    if gradual and not sel_list:
        fail("--gradual times the --selections: give those too")
    try:
        sweep_list = tuple(int(x) for x in sweep.split(",") if x.strip())
    except ValueError:
        fail("--sweep takes comma-separated token counts")
    cfg = BenchConfig(shape, device, dtype or ("bfloat16" if device.startswith("cuda") else "float32"), chunks,
                      chunk_tokens, question_tokens, tuple(unit_floats(ratios, "--ratios")), tier_list, warmup,
                      runs, sweep_list, check_layer, sel_list, gradual_layers, out / "profile" if profile else None,
                      None if random_weights else model)
    result = run_bench(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(write(result, out))


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{flag} takes comma-separated whole numbers")
    if any(v < 1 for v in vals):
        fail(f"{flag}: every value must be ≥ 1")
    return vals


@app.command("bench-serve")
def bench_serve(
    shape: Annotated[str, typer.Option(help="tiny, mistral-7b, llama-3.1-8b, qwen2.5-7b")] = "tiny",
    model: Annotated[Optional[str], typer.Option("--model", help="time this model instead of random weights of --shape")] = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[Optional[str], typer.Option(help="default: bfloat16 on cuda, float32 on cpu")] = None,
    chunks: Annotated[int, typer.Option(min=1, max=64)] = 6,
    chunk_tokens: Annotated[int, typer.Option(min=1)] = 512,
    question_tokens: Annotated[int, typer.Option(min=1)] = 64,
    output_tokens: Annotated[int, typer.Option(min=1)] = 128,
    pool: Annotated[int, typer.Option(min=1, help="distinct chunks the requests draw from")] = 24,
    requests: Annotated[int, typer.Option(min=1, help="requests per (rate, mode, batching) row")] = 32,
    rates: Annotated[str, typer.Option(help="Poisson arrival rates, requests/s, comma-separated")] = "1,2,4",
    modes: Annotated[str, typer.Option(help="comma-separated prefill modes")] = "full,blend",
    max_batch: Annotated[int, typer.Option(min=1, help="batched run's max batch; each row is also run with 1")] = 32,
    ratio: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.15,
    step_batches: Annotated[str, typer.Option(help="decode-step batch sizes to time ('' to skip)")] = "1,8,32",
    step_contexts: Annotated[str, typer.Option(help="decode-step context lengths to time")] = "1024,4096",
    out: Annotated[Path, typer.Option(help="directory for serve.json, serve.md, serve.png")] = Path("out/bench-serve"),
) -> None:
    """Serving throughput and latency under Poisson arrivals (the scheduler the REST API runs),
    full vs blend, batched vs --max-batch 1, in one run; and the batched decode step's time."""
    from blend.bench_serve import ServeBenchConfig, run_serve_bench, write
    from blend.shapes import SHAPES
    from blend.spec import MODES

    if model is None and shape not in SHAPES:
        fail(f"--shape must be one of {', '.join(SHAPES)}")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not mode_list or (bad := [m for m in mode_list if m not in MODES]):
        fail(f"--modes takes {', '.join(MODES)}")
    try:
        rate_list = tuple(float(x) for x in rates.split(",") if x.strip())
    except ValueError:
        fail("--rates takes comma-separated numbers")
    if not rate_list or any(not r > 0 for r in rate_list):
        fail("--rates: every rate must be > 0")
    if pool < chunks:
        fail(f"--pool ({pool}) must be at least --chunks ({chunks})")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            fail("--device cuda asked for, but CUDA is not available")
    cfg = ServeBenchConfig(shape, model, device, dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
                           chunks, chunk_tokens, question_tokens, output_tokens, pool, requests, rate_list,
                           mode_list, max_batch, ratio, _ints(step_batches, "--step-batches"),
                           _ints(step_contexts, "--step-contexts"))
    result = run_serve_bench(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(write(result, out))


from api.cli_eval import register as register_eval  # noqa: E402

register_eval(app)


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[Optional[str], typer.Option(help="bind address (default: 127.0.0.1, loopback only)")] = None,
    port: Annotated[Optional[int], typer.Option(help="(default: 8000)")] = None,
    data_dir: DataDirOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", help='"default" (bundled SmolLM2), HF dir/hub id, .gguf, random:<shape>')] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cpu)")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 (default: float32)")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="require `Authorization: Bearer KEY` on all routes but "
                                                        "/health and the docs. Visible in `ps`: prefer --api-key-file "
                                                        "or the environment variable RAGBLEND_API_KEY")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(
        envvar="RAGBLEND_API_KEY_FILE", help="read the API key from this file (its first line; env "
                                             "RAGBLEND_API_KEY_FILE), which keeps it out of `ps`")] = None,
    max_queue: Annotated[Optional[int], typer.Option(help="queries waiting for the model before 503 (default: 32)")] = None,
    chunk_tokens: Annotated[Optional[int], typer.Option(help="chunk size of documents added through the API (default: the data dir's recorded one, else 384)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="cap on a request's max_tokens (default: 512)")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="queries decoded together in one batched step; 1 serves "
                                                          "one at a time (default: 16)")] = None,
    kv_memory_mb: Annotated[Optional[int], typer.Option(help="decode KV memory, preallocated (default: 30% of free "
                                                             "GPU memory, 4096 on CPU)")] = None,
    slot_tokens: Annotated[Optional[int], typer.Option(help="most prompt + answer tokens per query (default: 4096)")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option(help="request body limit (default: 1 MiB)")] = None,
    max_upload_bytes: Annotated[Optional[int], typer.Option(help="document upload limit (default: 8 MiB)")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="uvicorn's: warning hides the access log (default: info)")] = None,
    threads: ThreadsOpt = None,
    kv_store: KvStoreOpt = None,
) -> None:
    """Serve the REST API (FastAPI on uvicorn). Every flag may also come from RAGBLEND_<FLAG>.

    The API key: --api-key-file FILE, or RAGBLEND_API_KEY / RAGBLEND_API_KEY_FILE in the
    environment, keep it out of the process list; --api-key KEY shows in `ps`."""
    from pydantic import ValidationError

    from api.app import serve as run
    from api.settings import Settings

    if api_key_file is not None:
        if api_key is not None:
            fail("give --api-key or --api-key-file, not both")
        try:
            lines = api_key_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--api-key-file {api_key_file}: cannot read it ({e})")
        api_key = lines[0].strip() if lines else ""
        if not api_key:
            fail(f"--api-key-file {api_key_file}: the file is empty; its first line is the key")
    set_threads(threads)
    try:
        settings = Settings.from_env(host=host, port=port, data_dir=data_dir, model=model, device=device,
                                     dtype=dtype, api_key=api_key, max_queue=max_queue, chunk_tokens=chunk_tokens,
                                     max_tokens=max_tokens, max_batch=max_batch, kv_memory_mb=kv_memory_mb,
                                     slot_tokens=slot_tokens, max_body_bytes=max_body_bytes,
                                     max_upload_bytes=max_upload_bytes, log_level=log_level, kv_store=kv_store)
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors(include_url=False)))
    import os

    # The data dir's recorded chunk size unless --chunk-tokens (or RAGBLEND_CHUNK_TOKENS) asks for one.
    asked = settings.chunk_tokens if chunk_tokens is not None or os.environ.get("RAGBLEND_CHUNK_TOKENS") else None
    service = _service(settings.data_dir, settings.model, settings.device, settings.dtype,
                       chunk_tokens=asked, kv_store=settings.kv_store,
                       embedder=(ctx.obj or {}).get("embedder"))  # handed in by tests/serve_for_tests.py
    run(settings, service)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
