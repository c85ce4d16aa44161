"""Health and Prometheus metrics."""
from __future__ import annotations

import torch
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.answering import question_token_limit
from api.deps import IndexerDep, MetricsDep, ServiceDep, SettingsDep, WorkerDep
from api.schemas import Health
from blend.loader import DEFAULT_MODEL
from blend.spec import default_penalties

router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])  # behind the API key, unlike /health


@router.get("/health", response_model=Health, summary="Model loaded, index size, queue depth",
            description="Open even when an API key is set (it shows counts, never content). "
                        "`status` is `degraded` (and the code 503) when the model worker has stopped.",
            responses={503: {"model": Health, "description": "the model worker has stopped"}})
def health(service: ServiceDep, worker: WorkerDep, indexer: IndexerDep, settings: SettingsDep,
           response: Response) -> Health:
    ok = worker.alive
    if not ok:
        response.status_code = 503
    return Health(status="ok" if ok else "degraded", model=service.engine.name, model_loaded=True,
                  device=str(service.engine.device), max_context=service.engine.max_context,
                  max_question_tokens=question_token_limit(service, settings), index_chunks=len(service.corpus),
                  queue_depth=worker.depth, max_queue=worker.max_queue, index_jobs_pending=indexer.pending,
                  threads=torch.get_num_threads(),
                  suggested_sampling=default_penalties(service.engine.name == DEFAULT_MODEL))


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            description="Requests by route and status, latency and TTFT histograms, tokens generated, "
                        "hot-tier hits and misses, queue depth, index size.",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
