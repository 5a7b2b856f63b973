"""Prometheus metrics of the search service, in a registry of its own (two apps in one process never share one).

Requests are counted by route template (not raw path: an id in the path would make a series per item), method,
status and outcome; latency is a histogram per route; the served version (bundle and index ids, vector count,
reloads) is read from the live holder at scrape time, so it can never be stale.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from cirflow.indexing.service.state import Published

# Single-query latencies on CPU sit between ~1 ms (a cached small model) and seconds (a large one under load).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _VersionCollector(Collector):
    def __init__(self, published: Published) -> None:
        self.published = published

    def collect(self) -> Iterator[Any]:
        version = self.published.version
        yield GaugeMetricFamily("cirflow_ready", "1 once an index version is loaded and served",
                                value=0 if version is None else 1)
        reloads = CounterMetricFamily("cirflow_reloads", "hot reloads by outcome", labels=["outcome"])
        for outcome, count in self.published.reloads.items():
            reloads.add_metric([outcome], count)
        yield reloads
        if version is None:
            return
        yield GaugeMetricFamily("cirflow_index_vectors", "catalog items in the served index version",
                                value=version.index.ntotal)
        yield InfoMetricFamily("cirflow_version", "the served index version and the bundle that encodes queries",
                               value={"bundle_id": version.bundle_id, "index_id": version.index_id,
                                      "catalog": version.catalog})
        yield GaugeMetricFamily("cirflow_version_loaded_timestamp_seconds", "when the served version was loaded",
                                value=version.loaded_at)
        # A sharded version's fan-out (search/sharded.py FanoutStats; kept across versions by a Ray Serve front);
        # a single index has no shards to count.
        stats = getattr(version.index, "fanout_stats", None)
        if stats is None:
            return
        retries = CounterMetricFamily("cirflow_shard_retries", "shard calls sent again after a failure or timeout",
                                      labels=["shard"])
        for shard in range(len(version.index.manifest["shards"])):
            retries.add_metric([str(shard)], stats.retries.get(shard, 0))
        yield retries
        yield CounterMetricFamily("cirflow_partial_answers", "answers missing some shards (flagged partial)",
                                  value=stats.partial)
        yield CounterMetricFamily("cirflow_unavailable_answers", "searches no shard answered (503)",
                                  value=stats.unavailable)


class ServiceMetrics:
    def __init__(self, published: Published) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cirflow_requests", "HTTP requests by route, method, status and outcome",
                                ["route", "method", "status", "outcome"], registry=self.registry)
        self.latency = Histogram("cirflow_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("cirflow_search_stage_seconds",
                                "POST /search time by stage (decode, encode, search; rerank where a model re-ranks)",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_VersionCollector(published))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        outcome = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
        self.requests.labels(route, method, str(status), outcome).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusOf:
    """An ASGI `send` that passes every message on and keeps the response's status: what the middlewares that
    record a request after it (metrics, access log) read. 500 until a response starts: an exception before it is
    answered with a 500 by the error middleware outside."""

    def __init__(self, send: Any) -> None:
        self.send, self.status = send, 500

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request (a plain ASGI class: BaseHTTPMiddleware would add its own
    task and stream copies to every request)."""

    def __init__(self, app: Any, metrics: ServiceMetrics, routes: list[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's routes (filled after this is made): to name requests refused unrouted
        self._plain: set[str] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent = StatusOf(send)
        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.observe(self._template(scope), scope["method"], sent.status, time.perf_counter() - start)

    def _template(self, scope: dict) -> str:
        """The matched route's path template; for a request refused before routing (a 413 from the body limit),
        its path when that is a route without parameters; else "unmatched" (raw paths would be unbounded)."""
        template = getattr(scope.get("route"), "path", None)
        if template:
            return template
        if self._plain is None:
            self._plain = {r.path for r in self.routes if "{" not in getattr(r, "path", "{")}
        return scope["path"] if scope["path"] in self._plain else "unmatched"
