"""The exporter's writes and its consumer loop against the real broker, with faults at its seams.

In process (not `python -m exporter`) so that a fault can be placed exactly: a rebalance that fails
after a poll fetched records, a dead-letter topic that refuses every record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from exporter.consume import ConsumerService
from exporter.deadletter import REASON_HEADER, dead_letter
from exporter.outbox import Letter, Outbox
from exporter.settings import ExporterSettings
from tests.factories import MessageFactory
from tests.helpers import wait_until
from tests.integration.conftest_exporter import TEST_ENV, delete_side_topics, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _read(bootstrap: str, topic: str, count: int) -> list[Any]:
    reader = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                           consumer_timeout_ms=10_000)  # fmt: skip
    try:
        return [r for _, r in zip(range(count), reader, strict=False)]
    finally:
        reader.close()


def test_a_record_without_key_or_value_is_dead_lettered_with_an_empty_value(
    kafka_bootstrap: str, fresh_topic: Callable[..., str]
) -> None:
    """Kafka allows such a record (a Java producer can write one); kafka-python refuses to send it."""
    dlq = fresh_topic(partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        outbox = Outbox(producer)
        record = SimpleNamespace(key=None, value=None, offset=7)
        outbox.send(dead_letter(dlq, TopicPartition("src", 0), record, "decode", "empty record"))
        settled = outbox.settle(timeout_seconds=30)
    finally:
        producer.close()
    assert settled.done and len(settled.acknowledged) == 1 and not settled.abandoned
    (written,) = _read(kafka_bootstrap, dlq, 1)
    assert (written.key, written.value) == (None, b"")
    assert dict(written.headers)[REASON_HEADER] == b"decode"


def test_a_refused_letter_holds_commits_back_then_is_abandoned(
    kafka_bootstrap: str, fresh_topic: Callable[..., str]
) -> None:
    """The broker refuses a record above the topic's max.message.bytes on every attempt."""
    topic = fresh_topic(partitions=1, configs={"max.message.bytes": "1024"})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", retries=0)
    try:
        outbox = Outbox(producer, max_attempts=3)
        large, small = Letter(topic, b"k", b"x" * 4096), Letter(topic, b"k", b"fits")
        outbox.send(large)
        outbox.send(small)
        acknowledged: list[Letter] = []
        for _ in range(20):  # a settle can end before the producer's retry of a split batch does
            settled = outbox.settle(timeout_seconds=30)
            acknowledged += settled.acknowledged
            if settled.done:
                break
            assert not settled.abandoned  # held back: not done while a letter is outstanding
        assert settled.done and settled.abandoned == [large] and acknowledged == [small]
        assert large.attempts == 3 and isinstance(large.error, KafkaError) and len(outbox) == 0
    finally:
        producer.close()


def _service(bootstrap: str, topic: str, group: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HEADWATCH_EXPORTER_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("HEADWATCH_EXPORTER_KAFKA__TOPIC", topic)
    monkeypatch.setenv("HEADWATCH_EXPORTER_KAFKA__DEAD_LETTER_TOPIC", f"{topic}.dlq")
    monkeypatch.setenv("HEADWATCH_EXPORTER_KAFKA__REFERENCE_TOPIC", f"{topic}.reference")
    monkeypatch.setenv("HEADWATCH_EXPORTER_KAFKA__GROUP_ID", group)
    settings = ExporterSettings()
    return ConsumerService(settings.kafka, settings.aggregate_policy())


def test_records_a_poll_fetched_are_folded_when_applying_a_rebalance_fails(
    kafka_bootstrap: str,
    fresh_topic: Callable[..., str],
    consumer_group: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebalance can fail to apply (the broker times out an offsets request) after the poll
    moved past records: they must be fetched again, folded and counted once."""
    topic = fresh_topic(partitions=1)
    service = _service(kafka_bootstrap, topic, consumer_group, monkeypatch)
    reconcile = service._reconcile
    failed: list[int] = []

    def fail_once_with_records(batches: dict[Any, list[Any]]) -> Any:
        if batches and not failed:
            failed.append(sum(len(records) for records in batches.values()))
            raise KafkaError("offsets request timed out (injected)")
        return reconcile(batches)

    monkeypatch.setattr(service, "_reconcile", fail_once_with_records)
    stop = threading.Event()
    worker = threading.Thread(target=service.run, args=(stop,), daemon=True)
    worker.start()
    try:
        wait_until(lambda: service.health()["assigned_partitions"] == 1, 60, 0.2, "assignment")
        factory = MessageFactory(layers=2, heads=4, kv_heads=2, seed=5)
        sent = 20
        produce(kafka_bootstrap, topic, [factory.message(timestamp_seconds=time.time())
                                         for _ in range(sent)])  # fmt: skip
        wait_until(lambda: service.stats().messages_total >= sent, 60, 0.2, "messages counted")
        time.sleep(2)  # a second fold of any record would show now
        assert failed and failed[0] > 0
        assert service.stats().messages_total == sent
        (snapshot,) = service.aggregator.snapshot()
        assert snapshot.window_samples == sent
        assert service.stats().duplicates == 0
    finally:
        stop.set()
        worker.join(timeout=30)
        delete_side_topics(kafka_bootstrap, topic)
    assert not worker.is_alive()
