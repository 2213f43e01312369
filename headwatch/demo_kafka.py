"""The demo's `--kafka` transport: the collector's KafkaSink, checked before and counted after.

Usage:
    publisher = KafkaPublisher.connect("127.0.0.1:9092")   # fails fast when no broker answers
    publisher.sink.publish(message); publisher.close_and_check(sent=1, timeout_seconds=10.0)

The rest of the Kafka settings (topic, acks, compression) come from HEADWATCH_COLLECTOR_KAFKA__*,
as for any collector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from headwatch.report.errors import HeadwatchToolError

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
    """A KafkaSink with its own collector metrics, so the demo can say what the broker acknowledged."""

    bootstrap: str
    sink: Any
    metrics: Any

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
        settings = load_settings().kafka.model_copy(update={"bootstrap_servers": bootstrap})
        metrics = CollectorMetrics()
        return cls(bootstrap, KafkaSink(settings, metrics), metrics)

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
        """Flush what is queued within `timeout_seconds` and stop the publisher thread."""
        self.sink.close(timeout_seconds)

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
