"""Sinks without a broker: memory, JSON lines, and the Kafka sink's bounds when no broker answers."""

from __future__ import annotations

import gc
import logging
import socket
import time
from pathlib import Path

import pytest

from collector import publish
from collector.metrics import CollectorMetrics
from collector.publish import FileSink, KafkaSink, MemorySink, host_port, read_jsonl
from collector.schema import HeadStatsMessage
from collector.settings import KafkaSettings
from tests.helpers import WaitTimeout, open_sockets, wait_until
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
    assert 0 < metrics.value("headwatch_collector_queue_bytes") <= 100_000
    sink.close()


def of_model(msg: HeadStatsMessage, model_name: str) -> HeadStatsMessage:
    header = msg.header.model_copy(update={"model_name": model_name})
    return HeadStatsMessage.build(header, {n: msg.stat(n) for n in msg.header.stat_names})


def test_queue_gauges_count_the_one_queue_every_model_shares(unreachable: KafkaSettings) -> None:
    """Two models publish through one sink: the gauges are the queue's, with no model_name."""
    settings = unreachable.model_copy(
        update={"queue_max_messages": 100, "reconnect_backoff_seconds": 60.0}
    )
    metrics = CollectorMetrics()
    sink = KafkaSink(settings, metrics)  # no broker: nothing leaves the queue
    try:
        for i, name in enumerate(["a", "b", "a"]):
            sink.publish(of_model(message(seed=i), name))
        assert metrics.value("headwatch_collector_queue_messages") == 3
        assert metrics.value("headwatch_collector_queue_bytes") == sink.queued[1] > 0
        queue_samples = [
            sample
            for family in metrics.registry.collect()
            if family.name.startswith("headwatch_collector_queue_")
            for sample in family.samples
        ]
        assert len(queue_samples) == 2
        assert all(sample.labels == {} for sample in queue_samples)
    finally:
        sink.close(timeout_seconds=0.1)
    assert metrics.value("headwatch_collector_queue_messages") == 0


def test_reconnect_attempts_wait_out_the_backoff_whatever_is_published(
    unreachable: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each publish wakes the publisher thread; only the backoff's deadline lets it try again."""
    attempts: list[float] = []
    probe = publish._accepts_connections

    def counting(servers: list[str], timeout_seconds: float) -> bool:
        attempts.append(time.monotonic())
        return probe(servers, timeout_seconds)

    monkeypatch.setattr(publish, "_accepts_connections", counting)
    backoff = 2.0
    settings = unreachable.model_copy(
        update={"queue_max_messages": 100, "reconnect_backoff_seconds": backoff}
    )
    sink = KafkaSink(settings, CollectorMetrics())
    try:
        sink.publish(message(seed=0))
        wait_until(lambda: attempts, 5.0, message="a first connection attempt")
        for i in range(1, 6):
            sink.publish(message(seed=i))
            with pytest.raises(WaitTimeout):  # no attempt inside the backoff
                wait_until(lambda: len(attempts) > 1, 0.05)
        wait_until(lambda: len(attempts) > 1, 5.0, message="an attempt after the backoff")
        assert attempts[1] - attempts[0] >= backoff
    finally:
        sink.close(timeout_seconds=0.1)


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


def sockets_around_failed_attempts(settings: KafkaSettings, attempts: int = 3) -> tuple[int, int]:
    """Open sockets before and after `attempts` failed connection attempts of a Kafka sink.

    The garbage collector is off meanwhile: what kafka-python leaves open sits in reference
    cycles, which only it would close.
    """
    sink = KafkaSink(settings, CollectorMetrics())  # nothing queued: its thread does not connect
    gc.collect()
    gc.disable()
    try:
        before = open_sockets()
        for _ in range(attempts):
            assert not sink._connect()
        return before, open_sockets()
    finally:
        gc.enable()
        sink.close()


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


@needs_proc
def test_failed_connection_attempts_leave_no_socket_open(unreachable: KafkaSettings) -> None:
    # kafka-python's producer opens connections while it looks for a broker, and raises without
    # closing them: a broker away for hours would cost sockets on every reconnect attempt.
    settings = unreachable.model_copy(update={"request_timeout_seconds": 0.3})
    before, after = sockets_around_failed_attempts(settings)
    assert after <= before, (before, after)


@needs_proc
def test_a_port_that_is_not_kafka_leaves_no_socket_open(unreachable: KafkaSettings) -> None:
    # Something accepts the connection but never answers as a broker: the producer is made and
    # fails to bootstrap.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        settings = unreachable.model_copy(
            update={"bootstrap_servers": f"127.0.0.1:{port}", "request_timeout_seconds": 0.3}
        )
        before, after = sockets_around_failed_attempts(settings)
    assert after <= before, (before, after)


def test_an_outage_is_logged_once_as_a_warning(
    unreachable: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    sink = KafkaSink(unreachable, CollectorMetrics())
    try:
        with caplog.at_level(logging.DEBUG, logger="collector.publish"):
            for _ in range(3):
                assert not sink._connect()
    finally:
        sink.close()
    records = [r for r in caplog.records if r.name == "collector.publish"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "unavailable" in records[0].getMessage()


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("127.0.0.1:9093", ("127.0.0.1", 9093)),
        (" broker ", ("broker", 9092)),
        ("[::1]:9094", ("::1", 9094)),
        ("[::1]", ("::1", 9092)),
        ("::1", ("::1", 9092)),
    ],
)
def test_bootstrap_servers_parse_as_kafka_python_reads_them(
    server: str, expected: tuple[str, int]
) -> None:
    assert host_port(server) == expected


@pytest.mark.parametrize("middle_keys", [0, 8, 64], ids=["default", "8-positions", "64-positions"])
def test_the_queue_charge_of_a_message_bounds_its_encoded_size_and_its_arrays(
    middle_keys: int,
) -> None:
    """The queue's byte cap holds only if the charge is at least what a message holds or sends."""
    import numpy as np

    from collector.sinks import estimated_bytes

    msg = message(layers=32, heads=32, seed=3)
    if middle_keys:
        rng = np.random.default_rng(0)
        positions = tuple(
            tuple(tuple(int(p) for p in rng.integers(100, 999, middle_keys)) for _ in range(32))
            for _ in range(32)
        )
        msg = HeadStatsMessage.build(
            msg.header.model_copy(update={"top_middle_positions": positions}),
            {n: msg.stat(n) for n in msg.header.stat_names},
        )
    charge = estimated_bytes(msg)
    assert charge >= len(msg.to_bytes())
    assert charge >= msg.arrays().values.nbytes + msg.arrays().valid.nbytes
