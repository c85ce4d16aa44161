"""What routes receive through `Depends`: the objects create_app put on `app.state`."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.indexer import Indexer
from api.metrics import Metrics
from api.service import RagService
from api.settings import Settings
from api.worker import ModelWorker


def _service(request: Request) -> RagService:
    return request.app.state.service


def _worker(request: Request) -> ModelWorker:
    return request.app.state.worker


def _indexer(request: Request) -> Indexer:
    return request.app.state.indexer


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[RagService, Depends(_service)]
WorkerDep = Annotated[ModelWorker, Depends(_worker)]
IndexerDep = Annotated[Indexer, Depends(_indexer)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
