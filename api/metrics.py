"""Prometheus metrics of one app, in a registry of its own (several apps in one process, as in
tests, never clash). Counters the service already keeps (hot-tier hits) are read at scrape time."""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Label values come from closed sets only: a client can invent methods and paths without end.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ragblend_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("ragblend_http_request_duration_seconds",
                                 "HTTP request duration (streams: until the last byte)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ragblend_ttft_seconds", "time to first token once the model is free "
                              "(KV load + prefill)", ["mode"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("ragblend_time_per_output_token_seconds", "mean time between a query's "
                              "output tokens after the first", buckets=TPOT_BUCKETS, registry=r)
        self.batch_size = Histogram("ragblend_decode_batch_size", "sequences in one batched decode step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_time = Histogram("ragblend_decode_step_seconds", "time of one batched decode step",
                                   buckets=TPOT_BUCKETS, registry=r)
        self.queue_wait = Histogram("ragblend_queue_wait_seconds", "time a query waited for the model",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("ragblend_tokens_generated", "tokens generated", registry=r)
        self.prompt_tokens = Counter("ragblend_prompt_tokens", "prompt tokens of answered queries: KV "
                                     "reused from cache, or computed", ["kv"], registry=r)
        self.ratio = Histogram("ragblend_recompute_ratio", "blend: the share of chunk tokens recomputed (the "
                               "loading controller may raise it above the asked ratio while KV streams)",
                               buckets=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0), registry=r)
        self.rejected = Counter("ragblend_queue_rejections", "requests refused because a queue was full",
                                ["queue"], registry=r)
        self.cancelled = Counter("ragblend_generations_cancelled", "queries stopped because the client left",
                                 registry=r)
        self.index_jobs = Counter("ragblend_index_jobs", "indexing jobs finished, by outcome", ["status"],
                                  registry=r)

    def watch(self, read: Callable[[], dict]) -> None:
        """Export what `read()` returns at each scrape: hot-tier counters, queue depths, index size."""
        self.registry.register(_Snapshot(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot:
    def __init__(self, read: Callable[[], dict]):
        self.read = read

    def describe(self):
        return []  # values exist only once the service is up; nothing to check at registration

    def collect(self):
        s = self.read()
        yield CounterMetricFamily("ragblend_hot_tier_hits", "chunk KVs found in the hot tier", value=s["hot_hits"])
        yield CounterMetricFamily("ragblend_hot_tier_misses", "chunk KVs read from LMDB (or recomputed)",
                                  value=s["hot_misses"])
        yield CounterMetricFamily("ragblend_kv_recomputed", "chunk KVs missing, corrupt or stale at query time",
                                  value=s["kv_recomputed"])
        tiers = CounterMetricFamily("ragblend_kv_tier_reads", "chunk KVs a query read, by the tier that held "
                                    "them (gpu, cpu: the hot tiers; store: LMDB or the shared tier)", labels=["tier"])
        for tier in ("gpu", "cpu", "store"):
            tiers.add_metric([tier], s[f"{tier}_reads"])
        yield tiers
        yield GaugeMetricFamily("ragblend_hot_tier_bytes", "bytes held by the hot tier", value=s["hot_bytes"])
        budgets = GaugeMetricFamily("ragblend_kv_tier_budget_bytes", "byte budget of each hot tier", labels=["tier"])
        for tier in ("gpu", "cpu"):
            budgets.add_metric([tier], s[f"{tier}_budget"])
        yield budgets
        yield GaugeMetricFamily("ragblend_queue_depth", "queries waiting for the model", value=s["queue_depth"])
        yield GaugeMetricFamily("ragblend_model_busy", "1 while a query holds the model", value=s["busy"])
        yield GaugeMetricFamily("ragblend_sequences_running", "sequences decoding in the batch", value=s["running"])
        yield GaugeMetricFamily("ragblend_sequences_waiting", "queries waiting to be admitted", value=s["waiting"])
        yield GaugeMetricFamily("ragblend_decode_kv_bytes_used", "decode KV memory held by running sequences",
                                value=s["kv_bytes_used"])
        yield GaugeMetricFamily("ragblend_decode_kv_bytes", "decode KV memory preallocated", value=s["kv_bytes_total"])
        yield GaugeMetricFamily("ragblend_index_jobs_pending", "indexing jobs waiting or running",
                                value=s["index_pending"])
        yield GaugeMetricFamily("ragblend_index_chunks", "chunks in the index", value=s["index_chunks"])


class RequestMetrics:
    """Pure ASGI (no BaseHTTPMiddleware, which would buffer streams and hide disconnects): counts
    every response under its route template, never the raw path, and under its method or
    "other" (label values from closed sets, however many distinct requests come in).

    Responses sent before routing (401, 413 from the middleware) have no route in the scope;
    they are matched against the templates of `paths()` (the OpenAPI paths)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Callable[[], Iterable[str]]):
        self.app, self.metrics, self.paths = app, metrics, paths
        self._patterns: list[tuple[re.Pattern, str]] | None = None

    def label(self, scope: Scope) -> str:
        route = scope.get("route")
        if getattr(route, "path", None):
            return re.sub(r":\w+}", "}", route.path)  # /documents/{doc_id:path} as in OpenAPI
        if self._patterns is None:
            self._patterns = [(re.compile("^" + re.sub(r"\\{[^}]+\\}", ".+", re.escape(p)) + "$"), p)
                              for p in self.paths()]
        return next((p for rx, p in self._patterns if rx.match(scope["path"])), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            name = self.label(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(name, method, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
