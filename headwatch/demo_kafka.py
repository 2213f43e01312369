"""The demo's `--kafka` transport: the collector's KafkaSink, checked before and counted after.

Usage:
    publisher = KafkaPublisher.connect("127.0.0.1:9092")   # fails fast when no broker answers
    publisher.sink.publish(message); publisher.close_and_check(sent=1, timeout_seconds=10.0)

The rest of the Kafka settings (topic, acks, compression) come from HEADWATCH_COLLECTOR_KAFKA__*,
as for any collector, and so do the model name and the collector's metrics endpoint
(HEADWATCH_COLLECTOR_MODEL_NAME, HEADWATCH_COLLECTOR_METRICS_PORT / _ADDRESS).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from headwatch.report.errors import HeadwatchToolError, PortInUseError

logger = logging.getLogger(__name__)


class KafkaUnavailableError(HeadwatchToolError):
    """No broker answered, or the broker did not acknowledge every message the demo sent."""


def _servers(bootstrap: str) -> list[str]:
    servers = [s.strip() for s in bootstrap.split(",") if s.strip()]
    well_formed = [s.rpartition(":") for s in servers]
    if not servers or not all(host and port.isdigit() for host, _, port in well_formed):
        raise KafkaUnavailableError(
            f"expected --kafka as host:port[,host:port...], got {bootstrap!r}"
        )
    return servers


@dataclass
class KafkaPublisher:
    """A KafkaSink and the collector metrics it counts into, served on the collector's endpoint.

    The demo hands the same metrics to attach(), so one endpoint shows what was sampled and what
    the broker acknowledged or dropped, and reads the acknowledged count from them at the end.
    """

    bootstrap: str
    sink: Any
    metrics: Any
    model_name: str = ""  # HEADWATCH_COLLECTOR_MODEL_NAME; "" lets the demo name the model

    @classmethod
    def connect(cls, bootstrap: str) -> KafkaPublisher:
        """Return a publisher to `bootstrap`, or raise KafkaUnavailableError when no broker answers."""
        from collector import KafkaSink
        from collector.metrics import CollectorMetrics
        from collector.settings import load_settings
        from headwatch.localstack.kafka import broker_answers

        servers = _servers(bootstrap)
        if not any(broker_answers(server) for server in servers):
            raise KafkaUnavailableError(
                f"expected a Kafka broker answering at {bootstrap}, got no answer "
                f"(start one with `headwatch stack up`, or drop --kafka to run in-process)"
            )
        settings = load_settings()
        metrics = CollectorMetrics()
        # attach() serves only the metrics it creates; these are the publisher's, so serve them here.
        if settings.metrics_port is not None:
            try:
                metrics.serve(settings.metrics_port, settings.metrics_address)
            except OSError as exc:
                raise PortInUseError(
                    f"expected to serve the collector's /metrics on "
                    f"{settings.metrics_address}:{settings.metrics_port}, got {exc}"
                ) from exc
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": bootstrap})
        return cls(bootstrap, KafkaSink(kafka, metrics), metrics, settings.model_name)

    @property
    def topic(self) -> str:
        """Return the topic messages go to."""
        return str(self.sink.settings.topic)

    def acknowledged(self, model_name: str) -> int:
        """Return the messages of `model_name` the broker acknowledged so far."""
        return int(self.metrics.value("headwatch_collector_published_total", model_name=model_name))

    def dropped(self, model_name: str) -> dict[str, int]:
        """Return the messages of `model_name` dropped so far, by reason (only reasons with drops)."""
        from collector.metrics import DROP_REASONS

        counts = {
            reason: int(
                self.metrics.value(
                    "headwatch_collector_dropped_total", model_name=model_name, reason=reason
                )
            )
            for reason in DROP_REASONS
        }
        return {reason: n for reason, n in counts.items() if n}

    def close(self, timeout_seconds: float) -> None:
        """Flush what is queued within `timeout_seconds`, stop the publisher thread and the endpoint."""
        self.sink.close(timeout_seconds)
        self.metrics.close()

    def close_and_check(self, model_name: str, sent: int, timeout_seconds: float) -> int:
        """Close, then return the acknowledged count; raise KafkaUnavailableError if any is missing."""
        self.close(timeout_seconds)
        acknowledged = self.acknowledged(model_name)
        if acknowledged != sent:
            raise KafkaUnavailableError(
                f"expected the broker at {self.bootstrap} to acknowledge {sent} messages on "
                f"{self.topic}, got {acknowledged} (dropped: {self.dropped(model_name) or 'none'})"
            )
        logger.info("published %d messages to %s topic=%s", sent, self.bootstrap, self.topic)
        return acknowledged
