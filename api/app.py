"""The FastAPI app: `create_app(settings, service)` wires settings, the service, the model worker,
the indexer and the metrics together; `serve(settings, service)` runs it on uvicorn."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPBearer

from api.docs_page import install_docs
from api.errors import install_handlers
from api.indexer import Indexer
from api.metrics import Metrics, RequestMetrics
from api.middleware import BearerAuth, BodyLimit, CatchAll
from api.request_log import RequestContext, use_json_logs
from api.routes import documents, openai, page, query, system
from api.service import RagService
from api.settings import Settings
from api.worker import ModelWorker
from blend.scheduler import SchedulerConfig

log = logging.getLogger(__name__)

DESCRIPTION = """Retrieval-augmented answers that reuse each chunk's precomputed KV cache
(CacheBlend). One scheduler owns the model: each step decodes every running query in one batch,
then prefills within a token budget; queries wait in a bounded queue in front of it and are refused with 503 + `Retry-After` when it is full. With an API key configured every route except
`/health` and these docs needs `Authorization: Bearer <key>`."""


def make_service(settings: Settings) -> RagService:
    """The service the settings describe (`ragblend serve` builds it itself, to fail early)."""
    from blend.engine import Engine
    from blend.loader import load_model

    from api.datadir import bind_model, check_model
    from api.service import default_data_dir

    engine = Engine(load_model(settings.model, device=settings.device, dtype=settings.dtype))
    path = settings.data_dir or default_data_dir()
    check_model(path, engine.name, engine.fingerprint)  # one data dir per model (api/datadir.py)
    mib = lambda v: None if v is None else v << 20  # noqa: E731
    service = RagService(path, engine=engine, chunk_tokens=settings.chunk_tokens, kv_store=settings.kv_store,
                         hot_bytes=mib(settings.gpu_tier_mb), pinned_bytes=mib(settings.cpu_tier_mb))
    bind_model(path, engine.name, engine.fingerprint)
    if service.kv.stream and settings.max_ratio > 0:  # chunk KV streams into the prefill: loading can hide recompute
        from blend.loading import LoadingController, calibrate

        engine.loading = LoadingController(calibrate(engine), ceiling=settings.max_ratio)
        log.info("loading controller calibrated: %s", engine.loading.cost)
    return service


def scheduler_config(settings: Settings, service: RagService) -> SchedulerConfig:
    """Decode slots sized from memory (kv_memory_mb, else the share of what is free), the batch
    as large as they allow unless max_batch caps it."""
    from blend.memory import decode_kv_bytes

    engine = service.engine
    slot_tokens = min(settings.slot_tokens, engine.max_context)
    if settings.kv_memory_mb:
        kv_bytes = settings.kv_memory_mb << 20
    else:
        hot = service.kv.gpu.max_bytes if engine.device.type == "cuda" else 0
        kv_bytes = decode_kv_bytes(engine.parts, engine.model.config, slot_tokens, settings.kv_memory_share, hot)
    return SchedulerConfig.for_memory(engine, kv_bytes, max_batch=settings.max_batch, slot_tokens=slot_tokens,
                                      max_waiting=settings.max_queue, prefill_tokens=settings.prefill_tokens)


def create_app(settings: Settings, service: RagService | None = None) -> FastAPI:
    """An app for `settings`. Without `service` the app builds its own at startup and closes it
    at shutdown; a service passed in stays the caller's to close."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or await run_in_threadpool(make_service, settings)
        worker = ModelWorker(svc, settings.max_queue, metrics, scheduler_config(settings, svc))
        indexer = Indexer(svc, settings.max_index_jobs, metrics)
        app.state.service, app.state.worker, app.state.indexer = svc, worker, indexer
        metrics.watch(lambda: _snapshot(svc, worker, indexer))
        worker.start()
        indexer.start()
        try:
            yield
        finally:
            worker.stop()
            indexer.stop()
            if service is None:
                svc.close()

    app = FastAPI(title="ragblend", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_docs(app)  # /docs and /redoc with their assets from a package, not a CDN
    app.state.settings, app.state.metrics = settings, metrics
    install_handlers(app)
    # Declares the scheme in the OpenAPI document (the docs' "Authorize" button); BearerAuth enforces it.
    secured = [Depends(HTTPBearer(auto_error=False))] if settings.secured else []
    app.include_router(system.router)
    app.include_router(page.router)  # the page is open; the API calls it makes carry the key
    app.include_router(system.metrics_router, dependencies=secured)
    app.include_router(query.router, dependencies=secured)
    app.include_router(documents.router, dependencies=secured)
    app.include_router(openai.router, dependencies=secured)
    # The last added runs first: metrics (counts every answer), then auth, then body limits, then
    # the catch-all that turns any error escaping the routes into a 500 the client receives.
    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, default=settings.max_body_bytes,
                       per_path={"/v1/documents": settings.max_upload_bytes})
    if settings.secured:
        app.add_middleware(BearerAuth, keys=settings.key_ring())
    app.add_middleware(RequestMetrics, metrics=metrics, paths=lambda: app.openapi()["paths"])
    app.add_middleware(RequestContext, log_access=settings.log_format == "json")  # outermost: every line has the id
    return app


def _snapshot(svc: RagService, worker: ModelWorker, indexer: Indexer) -> dict:
    kv = svc.kv.stats()
    return {"hot_hits": kv["gpu_hits"] + kv["cpu_hits"], "hot_misses": kv["store_reads"] + kv["recomputed"],
            "hot_bytes": kv["gpu_bytes"] + kv["cpu_bytes"], "kv_recomputed": kv["recomputed"],
            "gpu_reads": kv["gpu_hits"], "cpu_reads": kv["cpu_hits"], "store_reads": kv["store_reads"],
            "gpu_budget": kv["gpu_max_bytes"], "cpu_budget": kv["cpu_max_bytes"],
            "queue_depth": worker.depth, "busy": int(worker.busy), **worker.snapshot(),
            "index_pending": indexer.pending, "index_chunks": len(svc.corpus)}


def serve(settings: Settings, service: RagService | None = None) -> None:
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.secured:
        log.warning("serving on %s without an API key: anyone who can reach it can query and change the index",
                    settings.host)
    from api.connections import ACCEPT_BACKLOG, defer_accept, guarded_protocol, raise_fd_limit, rate_limit_logs

    app = create_app(settings, service)
    max_connections = raise_fd_limit(settings.max_connections)
    json_logs = settings.log_format == "json"
    if json_logs:
        use_json_logs(settings.log_level)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, timeout_keep_alive=settings.keep_alive_s,
                            backlog=max(ACCEPT_BACKLOG, max_connections),
                            http=guarded_protocol(max_connections, settings.request_timeout_s),
                            access_log=not json_logs,  # json: RequestContext logs access
                            **({"log_config": None} if json_logs else {}))
    rate_limit_logs("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio")  # after uvicorn set its handlers up
    sock = config.bind_socket()
    defer_accept(sock, settings.request_timeout_s)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if service is not None:
            service.close()
