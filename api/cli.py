"""The `ragblend` command line."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from api.config_file import ConfigOpt
from api.cli_common import (CheckLayersOpt, DeviationOpt, DeviceOpt, DtypeOpt, FrequencyPenaltyOpt, ModelOpt,
                            PresencePenaltyOpt, RepetitionPenaltyOpt, SelectionOpt, ThreadsOpt, check_layers_of, fail,
                            load_engine, penalties_given, selection_of, set_threads, unit_floats)
from blend.spec import (CPU_KV_MB, DEFAULT_CHECK_LAYER, DEFAULT_MAX_RATIO, DEFAULT_MAX_TOKENS, DEFAULT_RATIO,
                        KV_MEMORY_SHARE, PREFILL_TOKENS, SLOT_TOKENS, Mode)
from store.neighbours import DEFAULT_NEIGHBOUR_RULE, NEIGHBOUR_RULES
from store.quant import DEFAULT_FORMAT

class _App(typer.Typer):
    """The command line, where damaged data (the LMDB store, the registry) found by any command
    is one `error:` line naming the file and the repair, and exit code 1, never a traceback."""

    def __call__(self, *args, **kwargs):
        from retrieval.registry import RegistryDamaged
        from store.lmdb_store import StoreDamaged

        try:
            return super().__call__(*args, **kwargs)
        except (StoreDamaged, RegistryDamaged) as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(1)


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           context_settings={"help_option_names": ["-h", "--help"]},
           help="RAG serving with CacheBlend: reuse precomputed chunk KV caches.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ragblend {version('ragblend')}")
        except PackageNotFoundError:
            typer.echo("ragblend (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """RAG serving with CacheBlend: reuse precomputed chunk KV caches."""

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
    follow_symlinks: Annotated[bool, typer.Option("--follow-symlinks", help="read file symlinks that point outside "
                                                                            "the given directories (skipped by default)")] = False,
    neighbours: Annotated[Optional[int], typer.Option(min=0, max=2, help=(
        "neighbour-aware chunk KV (FusionRAG-style): also store each chunk's KV computed behind its N most similar "
        "chunks of the corpus, served by serve's --neighbour-rule; costs ~(N+1)× a chunk's prefill and one more entry "
        "per chunk (recorded in the data dir; default: the recorded one, else api.datadir.DEFAULT_NEIGHBOURS = 2; "
        "0 = off)"))] = None,
    config: ConfigOpt = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help="spread chunking, chunk-KV "
                                                       "precompute and embedding over a Ray cluster: auto (the running "
                                                       "one), local (start one here), or host:port; needs "
                                                       "pip install 'ragblend[ray]'")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(min=1, max=4096, help="Ray workers, each loading the model "
                                                       "once (default: one per GPU with --device cuda, else one per "
                                                       "CPU of the cluster)")] = None,
) -> None:
    """Chunk, embed and index documents, and precompute every chunk's KV into the store.

    Document ids are each root's name and the path below it (`projA/README.md`), or a JSONL
    line's `id`. An id that already names a different document (from another file, or added
    through the API) is refused and reported, never overwritten; the exit code is then 1."""
    from api.progress import TokenProgress
    from api.service import IndexReport
    from retrieval.loaders import collect_skips, load_roots

    for p in paths:
        if not p.exists():
            fail(f"no such file or directory: {p}")
    if index_kind not in ("flat", "hnsw"):
        fail("--index-kind must be flat or hnsw")
    if ray_workers is not None and not ray_address:
        fail("--ray-workers needs --ray ADDRESS")
    if ray_address:
        from api.ray_index import RayMissing, import_ray

        try:
            import_ray()
        except RayMissing as e:
            fail(str(e))
    n_threads = set_threads(threads)
    from api.service import default_data_dir

    with collect_skips() as skipped:
        docs = list(load_roots(paths, follow_outside=follow_symlinks, exclude=data_dir or default_data_dir()))
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
    from api.datadir import record_index, recorded_neighbours
    from api.index_plan import apply_store_settings, plan_index
    n_neighbours = neighbours if neighbours is not None else recorded_neighbours(service.data_dir)
    try:
        apply_store_settings(service, kv_dtype, max_store_gb)
        plan = plan_index(service, docs, n_neighbours)
    except ValueError as e:
        service.close()
        fail(str(e))
    typer.echo(plan.describe(), err=True)
    if (refusal := plan.refusal(allow_eviction)) is not None:
        service.close()
        fail(refusal)
    pool = None
    if ray_address:  # the workers load the model before the bar starts counting
        pool = _ray_pool(service, ray_address, ray_workers, kv_store, model, device, dtype, n_threads,
                         (ctx.obj or {}).get("embedder"))
    bar = TokenProgress(plan.changed_tokens, "indexing" + (f" on {pool.n} Ray workers" if pool else ""))
    report = IndexReport()
    interrupted = False
    failed: str | None = None
    try:
        with service.corpus.bulk():
            if pool is not None:
                from api.ray_index import index_on_ray

                index_on_ray(service, docs, pool, store_url=kv_store, progress=bar.update, report=report)
            else:
                service.index_documents(docs, bar.update, report)
        if n_neighbours or neighbours == 0:  # 0 asked: the recorded entries are dropped
            from api.neighbour_index import build

            t_nb = time.perf_counter()
            nb_report = build(service, n_neighbours)
            report.neighbour_seconds = time.perf_counter() - t_nb
            record_index(service.data_dir, neighbours=n_neighbours)
            report.neighbour_chunks += nb_report["neighbour_chunks"]
            report.neighbour_kv_computed += nb_report["neighbour_kv_computed"]
            report.neighbour_kv_deleted += nb_report["neighbour_kv_deleted"]
            typer.echo(f"neighbour-aware KV (--neighbours {n_neighbours}): {nb_report['neighbour_entries']} entries, "
                       f"{nb_report['neighbour_kv_computed']} computed, {nb_report['neighbour_kv_deleted']} dropped "
                       f"in {report.neighbour_seconds:.1f} s", err=True)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:
        failed = _index_failure(e)
        if failed is None:
            raise
    finally:
        bar.close()
        if pool is not None:
            if pool.restarts:
                typer.echo(f"Ray: {pool.restarts} workers replaced after dying; their documents were sent again",
                           err=True)
            pool.close()
        try:
            usage = service.store.usage()  # what the cap counts, after: set beside the estimate
        except OSError:  # the shared tier that just failed
            usage = None
        service.close()
    if failed is not None:
        fail(f"{failed}\n{report.committed} of {len(docs)} documents committed ({report.kv_computed} chunk KVs "
             "computed). Run the same command again once the store is back: committed documents are skipped as "
             "unchanged, and chunk KV already stored is reused.", code=1)
    if interrupted:
        typer.echo(f"\ninterrupted: {report.committed} of {len(docs)} documents committed ({report.kv_computed} "
                   "chunk KVs computed). Run the same command again to resume: committed documents are skipped "
                   "as unchanged, and chunk KV already stored is reused.", err=True)
        raise typer.Exit(130)
    report.skipped = skipped
    ray_summary = {} if pool is None else {"ray": {"workers": pool.n, "restarts": pool.restarts,
                                                    "startup_s": round(pool.startup_s, 3)}}
    summary = {**report.as_dict(), **ray_summary,
               "removed": removed, "collisions": collisions, "estimate": plan.as_dict(),
               "store": {**usage, "grew_bytes": usage["bytes"] - plan.store_bytes}}
    typer.echo(f"store: {summary['store']['grew_bytes'] / 1e9:.4g} GB written (estimated "
               f"{plan.estimated_bytes / 1e9:.4g} GB), {usage['bytes'] / 1e9:.4g} GB held, "
               f"{usage['evictions']} evictions in all", err=True)
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
    else:
        typer.echo(f"{summary['documents']} documents ({summary['unchanged']} unchanged), {summary['chunks']} chunks, "
                   f"{summary['kv_computed']} KVs computed in {summary['seconds']:.1f} s "
                   f"({summary['tokens_per_s'] or 0:.0f} tokens/s)"
                   + (f", {summary['neighbour_kv_computed']} neighbour-aware KVs in {summary['neighbour_seconds']:.1f} s"
                      if summary["neighbour_kv_computed"] else "")
                   + f" → {service.data_dir}"
                   + (f"; {len(removed)} removed (files gone)" if removed else "")
                   + (f"; {len(collisions)} refused (id taken)" if collisions else ""))
        _echo_skipped(skipped)
    if collisions:
        raise typer.Exit(1)


def _ray_pool(service, address: str, workers: Optional[int], kv_store: Optional[str], model: str, device: str,
              dtype: str, threads: int, embedder):
    """`index --ray`: the pool of Ray workers (api/ray_index.py), each with the model loaded."""
    from api.ray_index import WorkerPool, WorkerSpec, connect, default_workers, embedder_recipe

    try:
        connect(address, workers)
        spec = WorkerSpec(model, device, dtype, service.chunk_tokens, service.engine.fingerprint,
                          threads=1 if device == "cpu" else threads,  # a CPU worker is one CPU slot
                          embedder=embedder_recipe(embedder or service.corpus.embedder))
        pool = WorkerPool(spec, workers or default_workers(device))
    except ValueError as e:
        service.close()
        fail(str(e))
    typer.echo(f"Ray: {pool.n} workers ({device}) ready in {pool.startup_s:.1f} s; chunk KV "
               + ("written by them to the shared tier" if kv_store else "sent back to this process's LMDB"), err=True)
    return pool


def _index_failure(e: Exception) -> str | None:
    """The message for an index run stopped by its KV store (or a document failing on a Ray
    worker); None for anything else, which is a bug and keeps its traceback."""
    from api.ray_index import IndexRunFailed
    from store.redis_store import StoreUnavailable

    if isinstance(e, IndexRunFailed):
        cause = e.cause
        if isinstance(cause, StoreUnavailable):
            return f"the shared KV store failed during the run: {cause}"
        return f"indexing failed on a Ray worker: {e}"
    if isinstance(e, StoreUnavailable):
        return f"the shared KV store failed during the run: {e}"
    return None


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
    from api.neighbour_index import context_keys, referenced_keys

    path, kv, registry = _open_readonly(data_dir)
    stats = kv.stats()
    neighbour = context_keys(path)
    in_use = referenced_keys(path)  # neighbours.json's entries too, as `store gc` keeps them
    stored = set(kv.keys())
    stats.update(documents=len(registry.list_documents()), chunks=registry.count_chunks(),
                 referenced_keys=len(in_use), neighbour_entries=len(neighbour & stored),
                 unreferenced_entries=len(stored - in_use), missing_entries=len(in_use - stored),
                 path=str(stats["path"]))
    typer.echo(json.dumps(stats, indent=2))


@store_app.command("rebuild")
def store_rebuild(data_dir: DataDirOpt = None) -> None:
    """Set a damaged KV store aside (kv/ → kv.damaged-<time>/) and start an empty one. Chunk KV is
    a cache of what the registry's chunk texts give: each chunk's KV is recomputed when a query
    first needs it (or by `ragblend index` of documents that changed). Delete the old directory
    once the new store serves."""
    import time as _time

    from api.service import default_data_dir
    from store import KVStore

    path = data_dir or default_data_dir()
    kv = path / "kv"
    if not kv.exists():
        fail(f"no index in {path}")
    aside = path / f"kv.damaged-{_time.strftime('%Y%m%d-%H%M%S')}"
    kv.rename(aside)
    KVStore(kv).close()
    typer.echo(f"moved the old store to {aside}; a new, empty store is at {kv} (chunk KV is recomputed as needed)")


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
    from api.neighbour_index import referenced_keys

    store = KVStore(path / "kv")
    referenced = referenced_keys(path)
    unreferenced = sorted(set(store.keys()) - referenced)
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
    """Remove a document: its vectors, registry rows and KV entries (neighbour-aware ones included)."""
    from api.neighbour_index import forget
    from api.service import default_data_dir, remove_document
    from retrieval import Corpus, Embedder
    from store import KVStore

    path = data_dir or default_data_dir()
    if not (path / "corpus").exists():
        fail(f"no index in {path}")
    store = KVStore(path / "kv")
    removed = remove_document(Corpus(path / "corpus", Embedder()), doc_id, store.delete_many,
                              lambda gone: store.delete_many(list(forget(path, gone).values())))
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
    frequency_penalty: FrequencyPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    top_k: Annotated[int, typer.Option(min=1, max=64, help="chunks to retrieve")] = 6,
    min_score: Annotated[Optional[float], typer.Option(help="least cosine similarity a chunk needs; with none over it "
                                                            "the answer says the documents do not cover the question")] = None,
    filters: Annotated[Optional[list[str]], typer.Option("--filter", help="KEY=VALUE, repeatable: doc_id=ID, "
                                                         "doc_prefix=P, source=GLOB, or a metadata key=value")] = None,
    retrieval: Annotated[str, typer.Option(help="dense, bm25 or hybrid (both, reciprocal rank fusion)")] = "dense",
    reranker: Annotated[Optional[Path], typer.Option(help="rerank the candidates with this local CrossEncoder "
                                                          "directory")] = None,
    mmr: Annotated[Optional[float], typer.Option(help="maximal marginal relevance λ in (0, 1]: lower = more "
                                                      "diverse chunks (default: off)")] = None,
    data_dir: DataDirOpt = None,
    model: ModelOpt = "default",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    threads: ThreadsOpt = None,
    kv_store: KvStoreOpt = None,
) -> None:
    """Answer a question from the given chunks (--chunks) or from an indexed corpus. With the bundled
    model, penalties not given default to blend.spec.BUNDLED_PENALTIES (its answers loop without)."""
    from blend.loader import DEFAULT_MODEL
    from blend.spec import BadQuery, BlendConfig, QuerySpec, Sampling, default_penalties
    from retrieval.search import BadSearch, Filter, SearchOptions
    from retrieval.rules import text_problem

    q = question or question_arg
    if not q or not q.strip():
        fail("a question is needed (QUESTION or --question)")
    if problem := text_problem(q):  # bytes that are not UTF-8 arrive as lone surrogates
        fail(f"the question {problem}")
    set_threads(threads)
    given = penalties_given(frequency_penalty, presence_penalty, repetition_penalty)
    try:
        spec = QuerySpec(mode, BlendConfig.with_checks(check_layers_of(check_layer, check_layers), ratio=ratio,
                                                       selection=selection_of(selection, deviation)),
                         Sampling(temperature, top_p, seed, **{**default_penalties(model == DEFAULT_MODEL),
                                                               **given}), max_tokens)
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
        if reranker is not None:
            service.reranker = _reranker(reranker)
        try:
            options = SearchOptions(min_score, Filter.parse(filters or []), retrieval, reranker is not None, mmr)
            hits = service.retrieve(q, top_k, options).hits
        except BadSearch as e:
            fail(f"--{e.field.replace('_', '-')}: {str(e).split(': ', 1)[1]}")
        if not hits:
            _not_covered(min_score, as_json)
            return
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
            **({} if hits is None else {"covered": True, "chunks": [
                {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk": h.index + 1, "doc_chunks": h.doc_chunks,
                 "page": h.page, "score": round(h.score, 5), "text": h.text} for h in hits]}),
        }, ensure_ascii=False))
    else:
        if hits:  # the sources, under the answer
            typer.echo("sources:")
            for i, h in enumerate(hits, 1):
                page = f"  p. {h.page}" if h.page is not None else ""
                typer.echo(f"  [{i}] {h.doc_id}  chunk {h.index + 1}/{h.doc_chunks}{page}  score {h.score:.4f}")
                typer.echo(f"      {_passage(h.text)}")
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
    kv_dtypes: Annotated[str, typer.Option("--kv-dtype", help="the LMDB tier in each of these stored formats, "
                                           "comma-separated (int8, fp8, bfloat16, float16, float32); the first "
                                           "row is the default served configuration")] = DEFAULT_FORMAT,
    gradual: Annotated[Optional[str], typer.Option(help="with --selections: also time each with these check "
                                                        "layers (gradual filtering, e.g. 1,8)")] = None,
) -> None:
    """Measure TTFT of every mode × ratio × KV tier on random weights of a real model shape, every
    cell timed in turns; the headline row is what a default install serves."""
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
    from store.quant import kv_format
    try:
        formats = tuple(dict.fromkeys(kv_format(x).name for x in kv_dtypes.split(",") if x.strip()))
    except (ValueError, TypeError) as e:
        fail(f"--kv-dtype: {e}")
    cfg = BenchConfig(shape, device, dtype or ("bfloat16" if device.startswith("cuda") else "float32"), chunks,
                      chunk_tokens, question_tokens, tuple(unit_floats(ratios, "--ratios")), tier_list,
                      formats or (DEFAULT_FORMAT,), warmup, runs, sweep_list, check_layer, sel_list, gradual_layers,
                      out / "profile" if profile else None, None if random_weights else model)
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
    max_batch: Annotated[Optional[int], typer.Option(min=1, help="cap on the batch (default: as many as the decode "
                                                                 "memory holds, as serve); each rate row is also run "
                                                                 "with 1")] = None,
    one_at_a_time: Annotated[bool, typer.Option("--one-at-a-time/--batched-only",
                                                help="also run each rate row with max batch 1")] = True,
    ratio: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.15,
    step_batches: Annotated[str, typer.Option(help="decode-step batch sizes to time ('' to skip)")] = "1,8,32",
    step_contexts: Annotated[str, typer.Option(help="decode-step context lengths to time")] = "1024,4096",
    prefill_tokens: Annotated[int, typer.Option(min=16, help="prefill tokens per scheduler step")] = PREFILL_TOKENS,
    kv_memory_share: Annotated[float, typer.Option(min=0.01, max=1.0, help="share of the free GPU memory for decode "
                                                                         "slots")] = KV_MEMORY_SHARE,
    goodput: Annotated[str, typer.Option(help="output lengths to find goodput at, comma-separated (e.g. 32,128; "
                                              "'' for none)")] = "",
    goodput_requests: Annotated[int, typer.Option(min=1, help="requests per run of the goodput search")] = 200,
    goodput_runs: Annotated[int, typer.Option(min=1, help="runs per goodput search, after the saturation burst")] = 5,
    burst: Annotated[int, typer.Option(min=1, help="requests sent at once to find the saturation rate")] = 64,
    ttft_p99_ms: Annotated[float, typer.Option(help="goodput target: p99 time to first token")] = 1000.0,
    tpot_p99_ms: Annotated[float, typer.Option(help="goodput target: p99 time per output token")] = 50.0,
    time_budget: Annotated[Optional[float], typer.Option(help="seconds for the whole run: the goodput searches share "
                                                              "what is left and stop early rather than overrun")] = None,
    kv_tier: Annotated[str, typer.Option(help="where the chunk KV lives: gpu (device memory), cpu (pinned), lmdb "
                                              "(streamed per request, as serve reads what its hot tier lacks), "
                                              "lmdb-whole")] = "gpu",
    out: Annotated[Path, typer.Option(help="directory for serve.json, serve.md, serve.png")] = Path("out/bench-serve"),
) -> None:
    """Serving throughput and latency under Poisson arrivals (the scheduler the REST API runs,
    sized from memory as serve sizes it), full vs blend, batched vs --max-batch 1; with --goodput,
    the highest rate that keeps p99 TTFT and TPOT within the targets; and the decode step's time.
    --rates '' skips the fixed-rate rows."""
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
    if any(not r > 0 for r in rate_list):
        fail("--rates: every rate must be > 0")
    goodput_outputs = _ints(goodput, "--goodput")
    if pool < chunks:
        fail(f"--pool ({pool}) must be at least --chunks ({chunks})")
    if kv_tier not in ("gpu", "cpu", "lmdb", "lmdb-whole"):
        fail("--kv-tier takes gpu, cpu, lmdb or lmdb-whole")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            fail("--device cuda asked for, but CUDA is not available")
    cfg = ServeBenchConfig(shape, model, device, dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
                           chunks, chunk_tokens, question_tokens, output_tokens, pool, requests, rate_list,
                           mode_list, max_batch, ratio, _ints(step_batches, "--step-batches"),
                           _ints(step_contexts, "--step-contexts"), prefill_tokens=prefill_tokens,
                           kv_memory_share=kv_memory_share, goodput_outputs=goodput_outputs,
                           goodput_requests=goodput_requests, goodput_runs=goodput_runs, burst=burst,
                           ttft_p99_ms=ttft_p99_ms, tpot_p99_ms=tpot_p99_ms, time_budget_s=time_budget,
                           kv_tier=kv_tier, one_at_a_time=one_at_a_time)
    result = run_serve_bench(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(write(result, out))


@app.command("bench-http", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_http(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="served model (a random:<shape> speaking a real tokenizer)")] = "random:mistral-7b-smol",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cuda",
    dtype: Annotated[Optional[str], typer.Option(help="default: bfloat16 on cuda, float32 on cpu")] = None,
    modes: Annotated[str, typer.Option(help="comma-separated prefill modes")] = "blend",
    goodput: Annotated[str, typer.Option(help="output lengths to find goodput at, comma-separated")] = "128",
    pool: Annotated[int, typer.Option(min=1, help="documents indexed (one chunk each)")] = 24,
    chunk_tokens: Annotated[int, typer.Option(min=16)] = 512,
    top_k: Annotated[int, typer.Option(min=1)] = 6,
    question_tokens: Annotated[int, typer.Option(min=1)] = 64,
    ratio: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.15,
    requests: Annotated[int, typer.Option(min=1, help="requests per run of the search")] = 200,
    runs: Annotated[int, typer.Option(min=1, help="runs per search, after the saturation burst")] = 5,
    burst: Annotated[int, typer.Option(min=1, help="requests sent at once to find the saturation rate")] = 64,
    ttft_p99_ms: Annotated[float, typer.Option(help="goodput target: p99 time to first token")] = 1000.0,
    tpot_p99_ms: Annotated[float, typer.Option(help="goodput target: p99 time per output token")] = 50.0,
    data_dir: Annotated[Optional[Path], typer.Option(help="the server's data dir (default: a temporary one)")] = None,
    server_module: Annotated[str, typer.Option(help="module running the server: api.cli, or tests.serve_for_tests "
                                                    "(the hash embedder, where no embedding model is installed)")] = "api.cli",
    time_budget: Annotated[Optional[float], typer.Option(help="seconds for the whole run (server start included): "
                                                              "the searches stop early rather than overrun")] = None,
    out: Annotated[Path, typer.Option(help="directory for http.json")] = Path("out/bench-http"),
) -> None:
    """Goodput of `ragblend serve` itself over HTTP (streamed /v1/query, Poisson arrivals), the
    search bench-serve --goodput runs in process. Flags after `--` go to `ragblend serve`."""
    import tempfile

    from api.bench_http import HttpBenchConfig, run_http_bench
    from blend.goodput import Targets

    cfg = HttpBenchConfig(model, device, dtype or ("bfloat16" if device.startswith("cuda") else "float32"), pool,
                          chunk_tokens, top_k, question_tokens, tuple(m for m in modes.split(",") if m),
                          _ints(goodput, "--goodput"), ratio, requests, runs, burst, Targets(ttft_p99_ms, tpot_p99_ms),
                          serve_args=tuple(ctx.args), server_module=server_module, time_budget_s=time_budget)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_http_bench(cfg, data_dir or Path(tmp) / "data", log=lambda m: typer.echo(m, err=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "http.json").write_text(json.dumps(result, indent=1) + "\n")
    for g in result["goodput"]:
        typer.echo(f"HTTP goodput, {g['mode']}, {g['output_tokens']} output tokens: {g['goodput']:.2f} req/s "
                   f"(saturation {g['saturation']:.2f})")


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
        envvar="RAGBLEND_API_KEY_FILE", help="API keys, one a line: `NAME KEY` (or a bare KEY); the logs name the "
                                             "key used, and the file is read again when it changes (delete a line to "
                                             "revoke a key). Keeps keys out of `ps` (env RAGBLEND_API_KEY_FILE)")] = None,
    log_format: Annotated[Optional[str], typer.Option(help="text or json (one object a line, with the request id "
                                                           "and the API key's name) (default: text)")] = None,
    max_queue: Annotated[Optional[int], typer.Option(help="queries waiting for the model before 503 (default: 32)")] = None,
    chunk_tokens: Annotated[Optional[int], typer.Option(help="chunk size of documents added through the API (default: the data dir's recorded one, else 384)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="cap on a request's max_tokens (default: 512)")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="cap on the queries decoded together in one batched step; "
                                                          "1 serves one at a time (default: as many as the decode "
                                                          "memory holds)")] = None,
    kv_memory_mb: Annotated[Optional[int], typer.Option(help="decode KV memory in MiB, preallocated (default: "
                                                             "--kv-memory-share of the GPU memory left free, "
                                                             f"{CPU_KV_MB} on CPU)")] = None,
    kv_memory_share: Annotated[Optional[float], typer.Option(help="share of the GPU memory left once weights, prefill "
                                                                  "peak, decode graphs and device tier are counted "
                                                                  "that goes to decode slots (default: "
                                                                  f"{KV_MEMORY_SHARE})")] = None,
    prefill_tokens: Annotated[Optional[int], typer.Option(help="prefill tokens per scheduler step, after the running "
                                                               "queries' decode step; longer prompts are spread over "
                                                               f"steps (default: {PREFILL_TOKENS})")] = None,
    slot_tokens: Annotated[Optional[int], typer.Option(help="most prompt + answer tokens per query: one decode "
                                                            f"slot's length (default: {SLOT_TOKENS})")] = None,
    max_ratio: Annotated[Optional[float], typer.Option(help="on a GPU, how far the loading controller may raise the "
                                                            "recompute ratio of a blend query that names none, while "
                                                            f"its chunk KV streams from disk; 0: never (default: "
                                                            f"{DEFAULT_MAX_RATIO})")] = None,
    gpu_tier_mb: Annotated[Optional[int], typer.Option(help="chunk KV kept in device memory (default: a quarter of "
                                                            "the free device memory; 1024 on CPU)")] = None,
    cpu_tier_mb: Annotated[Optional[int], typer.Option(help="chunk KV kept in pinned host memory on CUDA (default: a "
                                                            "quarter of the available host memory, ≤ 64 GiB)")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option(help="request body limit (default: 1 MiB)")] = None,
    max_upload_bytes: Annotated[Optional[int], typer.Option(help="document upload limit (default: 8 MiB)")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="uvicorn's: warning hides the access log (default: info)")] = None,
    threads: ThreadsOpt = None,
    kv_store: KvStoreOpt = None,
    min_score: Annotated[Optional[float], typer.Option(help="least cosine similarity a chunk needs, unless a request "
                                                            "gives its own; under it for every chunk, the answer says "
                                                            "the documents do not cover the question (default: none)")] = None,
    reranker: Annotated[Optional[Path], typer.Option(help="a local CrossEncoder directory: requests with "
                                                          "`rerank: true` reorder their candidates with it")] = None,
    neighbour_rule: Annotated[str, typer.Option(help=(
        "where the data dir holds neighbour-aware chunk KV (index --neighbours): serve a chunk's entry computed behind "
        "its neighbours always, or only when one of them is retrieved too (retrieved); the first chunk always gets "
        "its plain, exact entry"))] = DEFAULT_NEIGHBOUR_RULE,
    served_model_name: Annotated[Optional[str], typer.Option(help="the model's name on the OpenAI routes "
                                                                  "(default: --model's value)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the REST API (FastAPI on uvicorn). Every flag may also come from RAGBLEND_<FLAG>.

    The API key: --api-key-file FILE, or RAGBLEND_API_KEY / RAGBLEND_API_KEY_FILE in the
    environment, keep it out of the process list; --api-key KEY shows in `ps`."""
    from pydantic import ValidationError

    from api.app import serve as run
    from api.settings import Settings

    if api_key_file is not None:
        from api.keys import KeyFileError, KeyRing

        if api_key is not None:
            fail("give --api-key or --api-key-file, not both")
        try:
            KeyRing(path=api_key_file)  # read once now: a bad file is an error before the model loads
        except KeyFileError as e:
            fail(f"--api-key-file {api_key_file}: {e}")
    set_threads(threads)
    try:
        settings = Settings.from_env(host=host, port=port, data_dir=data_dir, model=model, device=device,
                                     dtype=dtype, api_key=api_key, max_queue=max_queue, chunk_tokens=chunk_tokens,
                                     max_tokens=max_tokens, max_batch=max_batch, kv_memory_mb=kv_memory_mb,
                                     kv_memory_share=kv_memory_share, prefill_tokens=prefill_tokens,
                                     slot_tokens=slot_tokens, max_body_bytes=max_body_bytes,
                                     max_upload_bytes=max_upload_bytes, log_level=log_level, kv_store=kv_store,
                                     max_ratio=max_ratio, gpu_tier_mb=gpu_tier_mb, cpu_tier_mb=cpu_tier_mb,
                                     min_score=min_score, reranker=reranker, served_model_name=served_model_name,
                                     api_key_file=api_key_file, log_format=log_format)
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors(include_url=False)))
    import os

    if problem := _port_problem(settings.host, settings.port):  # before the model loads, not after
        fail(problem)
    # The data dir's recorded chunk size unless --chunk-tokens (or RAGBLEND_CHUNK_TOKENS) asks for one.
    asked = settings.chunk_tokens if chunk_tokens is not None or os.environ.get("RAGBLEND_CHUNK_TOKENS") else None
    hot = {} if settings.gpu_tier_mb is None else {"hot_bytes": settings.gpu_tier_mb << 20}
    service = _service(settings.data_dir, settings.model, settings.device, settings.dtype,
                       chunk_tokens=asked, kv_store=settings.kv_store, **hot, neighbour_rule=check_neighbour_rule(neighbour_rule),
                       embedder=(ctx.obj or {}).get("embedder"))  # handed in by tests/serve_for_tests.py
    if settings.reranker is not None:
        service.reranker = _reranker(settings.reranker)
    run(settings, service)


def check_neighbour_rule(rule: str) -> str:
    if rule not in NEIGHBOUR_RULES:
        fail(f"--neighbour-rule must be one of {', '.join(NEIGHBOUR_RULES)}, got {rule!r}")
    return rule


def _port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, found by binding it once (with the
    SO_REUSEADDR uvicorn sets, so only a port another socket listens on is refused)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"--host {host}: cannot resolve it ({e.strerror})"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return (f"cannot listen on {host}:{port} ({e.strerror}): another server may hold it; "
                    "pick another with --port")
    return None


def _reranker(path: Path):
    from retrieval.rerank import CrossEncoderReranker

    try:
        return CrossEncoderReranker(path)
    except (OSError, ValueError) as e:
        fail(f"--reranker {path}: {e}")


PASSAGE_CHARS = 160  # of each source's text shown under an answer (--json gives it whole)


def _passage(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PASSAGE_CHARS else flat[:PASSAGE_CHARS - 1].rstrip() + "…"


def _not_covered(min_score: float | None, as_json: bool) -> None:
    """What `ask` says when no chunk passes --min-score or --filter: no model call."""
    from api.answering import not_covered_text

    text = not_covered_text(min_score)
    typer.echo(json.dumps({"answer": text, "covered": False, "chunks": []}) if as_json else text)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
