"""The gateway's Prometheus metrics, on a registry of its own (one per app: tests run
several gateways in one process, and the worker's metrics live in the default registry).

What an operator tunes the window by: batch sizes against the window's wait, the cache's
hits and misses (the hit rate is hits / (hits + misses)), the upstream's latency, the texts
waiting or in flight (queue depth) and the requests answered, by route and status."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2048)
_WAITS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1)
_LATENCIES = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class GatewayMetrics:
    """The batcher's Observer, and the request counter of the app."""

    def __init__(self, depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._hits = self._misses = 0
        r = self.registry
        Gauge("pgembed_gateway_queue_depth", "Distinct texts waiting for their window or in flight upstream",
              registry=r).set_function(depth)
        self.batch_size = Histogram("pgembed_gateway_batch_size", "Texts per batch sent to the cache and provider",
                                    buckets=_SIZES, registry=r)
        self.window_wait = Histogram("pgembed_gateway_window_wait_seconds",
                                     "Time from a batch's first text to its flush", buckets=_WAITS, registry=r)
        self.cache_hits = Counter("pgembed_gateway_cache_hits", "Texts answered from the embedding cache",
                                  registry=r)
        self.cache_misses = Counter("pgembed_gateway_cache_misses", "Texts sent to the provider", registry=r)
        Gauge("pgembed_gateway_cache_hit_ratio", "Cache hits over all texts looked up since start",
              registry=r).set_function(self._hit_ratio)
        self.upstream_latency = Histogram("pgembed_gateway_upstream_latency_seconds",
                                          "Duration of one provider call (a batch's misses)",
                                          buckets=_LATENCIES, registry=r)
        self.requests = Counter("pgembed_gateway_requests", "HTTP requests answered",
                                ("route", "status"), registry=r)

    def _hit_ratio(self) -> float:
        looked_up = self._hits + self._misses
        return self._hits / looked_up if looked_up else 0.0

    def batch(self, size: int, waited: float) -> None:
        self.batch_size.observe(size)
        self.window_wait.observe(waited)

    def cache(self, hits: int, misses: int) -> None:
        self._hits += hits
        self._misses += misses
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)

    def upstream(self, seconds: float) -> None:
        self.upstream_latency.observe(seconds)
