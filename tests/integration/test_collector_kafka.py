"""The Kafka sink against a real broker that is absent at start, killed mid-run and restarted:
publish() never blocks, drops are counted, memory stays under the cap, publishing resumes by itself."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.metrics import CollectorMetrics
from collector.publish import KafkaSink
from collector.schema import HeadStatsMessage
from collector.settings import KafkaSettings
from headwatch.localstack.own_broker import OwnBroker
from headwatch.localstack.paths import StackPaths
from tests.helpers import open_sockets, wait_until
from tests.unit.test_schema import message

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(name="own_broker")
def fixture_own_broker(stack_paths: StackPaths, tmp_path: Path) -> Iterator[OwnBroker]:
    """A broker of this test alone (the session's shared one must not be killed)."""
    broker = OwnBroker(stack_paths, tmp_path, kafka_heap="384m")
    try:
        yield broker
    finally:
        broker.stop()


class Load:
    """Publishes a message every `interval` seconds on its own thread; records how long each
    publish() took."""

    def __init__(self, sink: KafkaSink, interval: float) -> None:
        self.sink = sink
        self.interval = interval
        self.durations: list[float] = []
        self._stop = threading.Event()
        self._template = message(32, 32)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.sink.publish(self._template)
            self.durations.append(time.perf_counter() - started)
            self._stop.wait(self.interval)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_never_blocked(self, settings: KafkaSettings) -> None:
        """publish() never waited on the broker.

        A publish that waited would wait out the reconnect backoff or the request timeout (0.5 s and
        3 s here), and most publishes would be slow. On a loaded two-core machine, where the broker's
        JVM starts alongside, a publish is now and then descheduled for tens of milliseconds: that
        is not the sink blocking, so the bound on the slowest is half the backoff.
        """
        durations = sorted(self.durations)
        assert durations, "no publish ran"
        median, slowest = durations[len(durations) // 2], durations[-1]
        assert median < 0.002, f"publish() took {median * 1000:.1f} ms (median)"
        assert slowest < settings.reconnect_backoff_seconds / 2, f"publish() blocked {slowest:.3f}s"


def test_broker_absent_killed_and_restarted(own_broker: OwnBroker) -> None:
    metrics = CollectorMetrics()
    settings = KafkaSettings(
        bootstrap_servers=own_broker.bootstrap, topic="headwatch.head-stats.v1", queue_max_messages=200,
        queue_max_bytes=2 << 20, producer_buffer_bytes=1 << 20, request_timeout_seconds=3.0,
        reconnect_backoff_seconds=0.5, flush_timeout_seconds=5.0,
    )  # fmt: skip
    sink = KafkaSink(settings, metrics)

    def published() -> float:
        return metrics.value("headwatch_collector_published_total", model_name="m")

    def dropped() -> float:
        return sum(
            metrics.value("headwatch_collector_dropped_total", model_name="m", reason=r)
            for r in ("queue_full", "broker_unavailable")
        )

    try:
        with Load(sink, interval=0.005) as load:
            # Broker down at start: the queue fills to its cap, then drops are counted.
            wait_until(lambda: dropped() > 0, 30, message="drops while no broker exists")
            assert sink.queued[1] <= settings.queue_max_bytes
            own_broker.start()
            wait_until(lambda: published() > 50, 120, message="publishing after the broker came up")
            # Broker killed mid-run.
            own_broker.kill()
            at_kill, drops_at_kill = published(), dropped()
            wait_until(
                lambda: dropped() > drops_at_kill + 50, 60, message="drops while the broker is dead"
            )
            assert sink.queued[1] <= settings.queue_max_bytes
            assert sink.in_flight_bytes <= settings.producer_buffer_bytes + 64 * 1024
            own_broker.start()
            wait_until(
                lambda: published() > at_kill + 50, 120, message="publishing resumed after restart"
            )
        load.assert_never_blocked(settings)
        started = time.perf_counter()
        sink.close()
        assert time.perf_counter() - started < settings.flush_timeout_seconds + 2
    finally:
        sink.close()  # a failed assertion must not leave the publisher thread reconnecting

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        settings.topic, bootstrap_servers=own_broker.bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )  # fmt: skip
    try:
        decoded = [HeadStatsMessage.from_bytes(record.value) for record in consumer]
    finally:
        consumer.close()
    assert len(decoded) >= at_kill
    assert all(m.num_layers == 32 and m.num_query_heads == 32 for m in decoded)


def test_closing_while_the_broker_is_dead_stops_the_producer(own_broker: OwnBroker) -> None:
    """kafka-python 3's close() raises when it cannot flush and leaves its network thread
    reconnecting for the life of the process: the sink stops it, and counts what was unsent."""
    metrics = CollectorMetrics()
    settings = KafkaSettings(
        bootstrap_servers=own_broker.bootstrap, topic="headwatch.head-stats.v1",
        request_timeout_seconds=3.0, reconnect_backoff_seconds=0.2, flush_timeout_seconds=1.0,
    )  # fmt: skip
    own_broker.start()
    before = set(threading.enumerate())
    sink = KafkaSink(settings, metrics)
    sink.publish(message(32, 32))
    wait_until(
        lambda: metrics.value("headwatch_collector_published_total", model_name="m") == 1,
        60, message="the first message published",
    )  # fmt: skip
    producer_threads = [t for t in set(threading.enumerate()) - before if "kafka" in t.name]
    assert producer_threads, "expected kafka-python's network thread"
    own_broker.kill()
    for _ in range(20):
        sink.publish(message(32, 32))
    started = time.perf_counter()
    sink.close()
    assert time.perf_counter() - started < settings.flush_timeout_seconds + 4
    wait_until(
        lambda: not any(t.is_alive() for t in producer_threads),
        10, message="kafka-python's network thread stopped",
    )  # fmt: skip
    counted = metrics.value("headwatch_collector_published_total", model_name="m") + sum(
        metrics.value("headwatch_collector_dropped_total", model_name="m", reason=r)
        for r in ("queue_full", "broker_unavailable", "too_large", "closed")
    )
    assert counted == 21


def test_a_long_outage_holds_no_growing_number_of_sockets(own_broker: OwnBroker) -> None:
    """kafka-python reconnects once per backoff, each failed attempt holding its socket until the
    garbage collector runs (off here): the sink closes the producer once its sends fail and no
    broker accepts a connection, probes instead, and makes a new producer when one answers."""
    metrics = CollectorMetrics()
    settings = KafkaSettings(
        bootstrap_servers=own_broker.bootstrap, topic="headwatch.head-stats.v1",
        request_timeout_seconds=1.0, reconnect_backoff_seconds=0.2, flush_timeout_seconds=1.0,
    )  # fmt: skip

    def published() -> float:
        return metrics.value("headwatch_collector_published_total", model_name="m")

    own_broker.start()
    sink = KafkaSink(settings, metrics)
    try:
        with Load(sink, interval=0.05):
            wait_until(lambda: published() > 5, 60, message="publishing before the outage")
            gc.collect()
            gc.disable()
            try:
                own_broker.kill()
                time.sleep(6)  # sends fail after 3 request timeouts
                early = open_sockets()
                time.sleep(6)
                late = open_sockets()
            finally:
                gc.enable()
            assert late <= early + 1, (early, late)
            at_restart = published()
            own_broker.start()
            wait_until(
                lambda: published() > at_restart + 5, 60, message="publishing after the restart"
            )
    finally:
        sink.close()
