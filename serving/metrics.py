"""Prometheus metrics for /metrics, in the text format vLLM's server also exposes.

HTTP requests, their latency and token counts are observed as they happen; what the engine and
the adapter pool hold (queue depth, batches, resident adapters) is read when Prometheus scrapes,
without taking the pool's lock (a scrape must never wait for a batch). Each server has its own
registry, so several servers in one process (tests, benchmarks) do not share counters.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from serving.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format 0.0.4
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _EngineCollector:
    """Reads the engine's and the pool's counters at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        engine, pool, stats = self.engine, self.engine.pool, self.engine.stats
        yield GaugeMetricFamily(
            "lowregret_requests_waiting", "Requests accepted and waiting for a batch (queue depth).", engine.waiting
        )
        yield GaugeMetricFamily("lowregret_requests_running", "Rows in the batch being generated.", engine.running)
        yield GaugeMetricFamily(
            "lowregret_queue_capacity", "Requests that may wait or run at once (--max-pending).", engine.max_pending
        )
        yield GaugeMetricFamily("lowregret_adapters_served", "Adapters registered under a name.", len(pool.entries()))
        yield GaugeMetricFamily(
            "lowregret_adapters_loaded", "Adapters resident in the model now.", len(pool.resident_names())
        )
        yield CounterMetricFamily("lowregret_adapter_loads", "Adapter loads into the model.", pool.loads)
        yield CounterMetricFamily("lowregret_adapter_evictions", "Least-recently-used evictions.", pool.evictions)
        yield CounterMetricFamily("lowregret_batches", "generate calls.", stats.batches)
        yield CounterMetricFamily(
            "lowregret_mixed_batches", "generate calls whose rows named two or more models.", stats.mixed_batches
        )
        sizes = dict(stats.batch_sizes)
        buckets = [(str(le), sum(n for size, n in sizes.items() if size <= le)) for le in _BATCH_SIZE_BUCKETS]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily(
            "lowregret_batch_size",
            "Rows per generate call.",
            buckets=buckets,
            sum_value=sum(size * n for size, n in sizes.items()),
        )


class ServerMetrics:
    """The registry behind one server's /metrics."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lowregret_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lowregret_http_request_duration_seconds",
            "Time from request to the last byte of the answer (streams included), by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lowregret_prompt_tokens", "Prompt tokens of answered requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "lowregret_generation_tokens", "Completion tokens generated.", registry=self.registry
        )
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app):
        """An ASGI middleware counting every HTTP request and timing it to its last byte."""

        async def observed(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            started = time.perf_counter()
            status = [500]

            async def send_and_note(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_and_note)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                self.requests.labels(route, scope["method"], str(status[0])).inc()
                self.latency.labels(route).observe(time.perf_counter() - started)

        return observed
