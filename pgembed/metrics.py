"""Prometheus metrics of one worker (`pgembed worker --metrics-port 9464`).

Optional: prometheus-client is imported only when metrics are asked for, and a worker
without them updates a `Metrics` whose methods do nothing. Each worker gets its own
registry, so several workers in one process (tests, Client.sync) never collide.

Rows/s is `rate(pgembed_rows_total[1m])`; the cache hit rate is
`rate(pgembed_cache_hits_total[5m]) / (rate(pgembed_cache_hits_total[5m]) + rate(pgembed_cache_misses_total[5m]))`.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("pgembed.metrics")

# Embedding calls take from milliseconds (cache-warm local model) to a minute (retries).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class MetricsUnavailable(RuntimeError):
    """--metrics-port was given but prometheus-client is not installed."""


class Metrics:
    """The worker's instruments. `Metrics()` is the disabled one: every call is a no-op."""

    def __init__(self, registry: Any = None) -> None:
        self.registry = registry
        self.enabled = registry is not None
        if not self.enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=registry)

        self.queue = Gauge("pgembed_queue_depth", "Outbox rows by state (whole database, all pipelines).",
                           ("state",), registry=registry)
        self.in_flight = Gauge("pgembed_batches_in_flight", "Batches this worker is embedding now.",
                               registry=registry)
        self.rows = counter("pgembed_rows", "Rows acknowledged, by outcome (written, removed, failed, "
                            "changed, lost).", ("pipeline", "outcome"))
        self.batches = counter("pgembed_batches", "Batches acknowledged.", ("pipeline",))
        self.latency = Histogram("pgembed_api_request_seconds",
                                 "Time of one provider.embed call (retries included).", ("model",),
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.api_errors = counter("pgembed_api_errors", "Provider calls that failed as a whole.", ("model",))
        self.requests = counter("pgembed_api_requests", "HTTP requests made to the provider.", ("model",))
        self.tokens = counter("pgembed_tokens", "Tokens billed by the provider.", ("model",))
        self.hits = counter("pgembed_cache_hits", "Chunks served by pgembed.embedding_cache.", ("model",))
        self.misses = counter("pgembed_cache_misses", "Chunks that had to be embedded.", ("model",))
        self.jobs = counter("pgembed_job_runs", "Scheduled job runs by this worker.", ("job", "ok"))

    def batch(self, pipeline: str, outcomes: dict[str, int]) -> None:
        if not self.enabled:
            return
        self.batches.labels(pipeline).inc()
        for outcome, n in outcomes.items():
            if n:
                self.rows.labels(pipeline, outcome).inc(n)

    def usage(self, model: str, requests: int, tokens: int, hits: int, misses: int) -> None:
        if not self.enabled:
            return
        self.requests.labels(model).inc(requests)
        self.tokens.labels(model).inc(tokens)
        self.hits.labels(model).inc(hits)
        self.misses.labels(model).inc(misses)

    def api_call(self, model: str, seconds: float, ok: bool) -> None:
        if not self.enabled:
            return
        self.latency.labels(model).observe(seconds)
        if not ok:
            self.api_errors.labels(model).inc()

    def queue_depth(self, ready: int, leased: int, waiting: int) -> None:
        if not self.enabled:
            return
        for state, n in (("ready", ready), ("leased", leased), ("waiting", waiting)):
            self.queue.labels(state).set(n)

    def batches_in_flight(self, n: int) -> None:
        if self.enabled:
            self.in_flight.set(n)

    def job(self, job: str, ok: bool) -> None:
        if self.enabled:
            self.jobs.labels(job, "true" if ok else "false").inc()


class MetricsServer:
    """The HTTP endpoint (a thread of prometheus-client's) serving one registry."""

    def __init__(self, address: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as error:
            raise MetricsUnavailable(
                "--metrics-port needs the prometheus-client package: pip install 'pgembed[metrics]'"
            ) from error
        self.metrics = Metrics(CollectorRegistry(auto_describe=True))
        try:
            self._server, self._thread = start_http_server(port, address, registry=self.metrics.registry)
        except OSError as error:
            raise MetricsUnavailable(f"cannot serve metrics on {address}:{port}: {error.strerror}") from error
        self.address = address
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", address, self.port, extra={"action": "metrics"})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
