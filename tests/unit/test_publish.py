"""Sinks without a broker: memory, JSON lines, and the Kafka sink's bounds when no broker answers."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from collector.metrics import CollectorMetrics
from collector.publish import FileSink, KafkaSink, MemorySink, read_jsonl
from collector.settings import KafkaSettings
from tests.unit.test_schema import message


def closed_port() -> int:
    """A local port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_memory_sink_keeps_messages() -> None:
    sink = MemorySink()
    sink.publish(message())
    assert len(sink.messages) == 1


def test_file_sink_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "stats.jsonl"
    sink = FileSink(path)
    originals = [message(seed=i) for i in range(3)]
    for m in originals:
        sink.publish(m)
    sink.close()
    assert read_jsonl(path) == originals


@pytest.fixture(name="unreachable")
def fixture_unreachable() -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{closed_port()}", queue_max_messages=5, queue_max_bytes=1 << 20,
        flush_timeout_seconds=1.0, request_timeout_seconds=1.0, reconnect_backoff_seconds=0.2,
    )  # fmt: skip


def test_kafka_sink_drops_and_counts_when_the_queue_is_full(unreachable: KafkaSettings) -> None:
    metrics = CollectorMetrics()
    sink = KafkaSink(unreachable, metrics)
    messages = [message(seed=i) for i in range(50)]
    slowest = 0.0
    for m in messages:
        started = time.perf_counter()
        sink.publish(m)
        slowest = max(slowest, time.perf_counter() - started)
    assert sink.queued[0] <= 5
    assert (
        metrics.value("headwatch_collector_dropped_total", model_name="m", reason="queue_full")
        >= 45
    )
    # A publish that waited for the broker would take the 1 s request timeout.
    assert slowest < 0.5
    sink.close()


def test_kafka_sink_bounds_queue_bytes(unreachable: KafkaSettings) -> None:
    settings = unreachable.model_copy(
        update={"queue_max_messages": 10_000, "queue_max_bytes": 100_000}
    )
    metrics = CollectorMetrics()
    sink = KafkaSink(settings, metrics)
    for i in range(200):
        sink.publish(message(seed=i))
    assert sink.queued[1] <= 100_000
    assert metrics.value("headwatch_collector_queue_bytes", model_name="m") <= 100_000
    sink.close()


def test_close_is_bounded_and_counts_what_is_left(unreachable: KafkaSettings) -> None:
    metrics = CollectorMetrics()
    sink = KafkaSink(unreachable, metrics)
    for i in range(5):
        sink.publish(message(seed=i))
    started = time.perf_counter()
    sink.close(timeout_seconds=1.0)
    assert time.perf_counter() - started < 5.0
    sink.publish(message())
    dropped = metrics.value("headwatch_collector_dropped_total", model_name="m", reason="closed")
    assert dropped == 6
