"""The collector's self-metrics (prometheus_client), in their own registry, with an optional endpoint.

Usage:
    metrics = CollectorMetrics()
    metrics.serve(port=9464)            # optional: http://127.0.0.1:9464/metrics

Names are those of docs/metrics.md. Nothing is registered at import time.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

DROP_REASONS = ("queue_full", "broker_unavailable", "too_large", "closed")
# Passes the collector sees but cannot measure: continuous batching (one packed row over a paged
# cache), and sampled passes that reached no wrapped attention function. Passes run compiled are
# not counted: counting inside a trace would make the compiled code recompile on every pass.
UNMEASURED_REASONS = ("continuous_batching", "unwrapped_attention")


class CollectorMetrics:
    """Counters, gauges and a histogram about what the collector did."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sampled = Counter(
            "headwatch_collector_sampled", "Forward passes measured", ["model_name"], registry=r
        )
        self.published = Counter(
            "headwatch_collector_published",
            "Messages handed to Kafka and acknowledged",
            ["model_name"],
            registry=r,
        )
        self.dropped = Counter(
            "headwatch_collector_dropped", "Messages dropped", ["model_name", "reason"], registry=r
        )
        # No model_name: one queue serves every model attached to a sink; a per-model series
        # would go stale as soon as another model's message moved the queue.
        self.queue_messages = Gauge(
            "headwatch_collector_queue_messages",
            "Messages waiting in the publisher queue",
            registry=r,
        )
        self.queue_bytes = Gauge(
            "headwatch_collector_queue_bytes",
            "Bytes waiting in the publisher queue",
            registry=r,
        )
        self.stats_seconds = Histogram(
            "headwatch_collector_stats_seconds",
            "Time spent computing statistics per sampled pass",
            ["model_name"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.hook_errors = Counter(
            "headwatch_collector_hook_errors",
            "Exceptions caught inside the attention hook",
            ["model_name"],
            registry=r,
        )
        self.unmeasured = Counter(
            "headwatch_collector_unmeasured_passes",
            "Forward passes the collector could not measure, by reason",
            ["model_name", "reason"],
            registry=r,
        )
        self.hook_enabled = Gauge(
            "headwatch_collector_hook_enabled",
            "0 once the hook disabled itself after repeated failures",
            ["model_name"],
            registry=r,
        )
        self._server: Any = None

    def drop(self, model_name: str, reason: str, count: int = 1) -> None:
        """Count dropped messages by reason."""
        self.dropped.labels(model_name=model_name, reason=reason).inc(count)

    def value(self, name: str, **labels: str) -> float:
        """Return a sample's current value (0 when absent); `name` as exposed, e.g. `..._total`."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else float(found)

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve /metrics on address:port (0 picks a free port); return the port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        bound = int(server.server_address[1])
        logger.info("collector metrics on http://%s:%d/metrics", address, bound)
        return bound

    def close(self) -> None:
        """Stop the endpoint, if one was started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
