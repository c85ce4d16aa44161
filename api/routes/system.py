"""Health and Prometheus metrics."""
from __future__ import annotations

import torch
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.answering import question_token_limit
from api.deps import IndexerDep, MetricsDep, ServiceDep, SettingsDep, WorkerDep
from api.schemas import Health
from store.redis_store import TieredKVStore
from blend.loader import DEFAULT_MODEL
from blend.spec import default_penalties

router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])  # behind the API key, unlike /health


@router.get("/health", response_model=Health, summary="Model loaded, index size, queue depth",
            description="Open even when an API key is set (it shows counts, never content). "
                        "`status` is `warming` (and the code 503) while the server captures its decode graphs at "
                        "start, `degraded` (503) when the model worker has stopped, and `degraded` (code 200: "
                        "answers still come) while the shared KV tier is unhealthy.",
            responses={503: {"model": Health, "description": "warming up, or the model worker has stopped"}})
def health(service: ServiceDep, worker: WorkerDep, indexer: IndexerDep, settings: SettingsDep,
           response: Response) -> Health:
    status = "degraded" if not worker.alive else "warming" if worker.warming else "ok"
    if status != "ok":
        response.status_code = 503
    config = worker.scheduler.config
    shared = service.store.shared.health if isinstance(service.store, TieredKVStore) else None
    if status == "ok" and shared is not None and shared["status"] != "ok":
        status = "degraded"  # answers still come (recomputed): 200
    return Health(status=status, model=service.engine.name, model_loaded=True, shared_kv=shared,
                  device=str(service.engine.device), max_context=service.engine.max_context,
                  max_question_tokens=question_token_limit(service, settings), index_chunks=len(service.corpus),
                  queue_depth=worker.depth, max_queue=worker.max_queue, index_jobs_pending=indexer.pending,
                  threads=torch.get_num_threads(), max_batch=config.max_batch, prefill_tokens=config.prefill_tokens,
                  suggested_sampling=default_penalties(service.engine.name == DEFAULT_MODEL))


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            description="Requests by route and status, latency and TTFT histograms, tokens generated, "
                        "hot-tier hits and misses, queue depth, index size.",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
