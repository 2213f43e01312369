"""The test harness talks to a real Kafka broker, Prometheus and Alertmanager."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.codec import has_zstd
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from headwatch.localstack.paths import StackPaths
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.stack import LocalStack
from tests.helpers import (
    AlertmanagerService,
    PrometheusService,
    prometheus_api,
    query_values,
    unique_name,
    wait_until,
)

pytestmark = pytest.mark.integration

MESSAGES = 1000
KEYS = 37
# poll() returns as soon as records arrive, so a long timeout costs nothing. Short ones do harm:
# with kafka-python 3.0.12, a member whose poll(timeout_ms=100) expires while its JoinGroup /
# SyncGroup is in flight can stay without an assignment for good (seen in 2 of 8 runs of two
# consumers joining at once; 0 of 8 with 1000 ms polls, 0 of 8 with kafka-python 2.3.3).
POLL_MS = 1000


def _produce(bootstrap: str, topic: str, count: int = MESSAGES) -> dict[int, list[int]]:
    """Produce `count` keyed, zstd-compressed messages; return message numbers per partition."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type="zstd", linger_ms=5)
    try:
        futures = [
            (
                i,
                producer.send(
                    topic, key=f"key-{i % KEYS}".encode(), value=json.dumps({"i": i}).encode()
                ),
            )
            for i in range(count)
        ]
        producer.flush(timeout=60)
        by_partition: dict[int, list[int]] = {}
        for i, future in futures:
            metadata = future.get(timeout=30)
            by_partition.setdefault(metadata.partition, []).append(i)
        return by_partition
    finally:
        producer.close()


def _number(record: Any) -> int:
    value: int = json.loads(record.value)["i"]
    return value


@pytest.fixture(name="consumer_factory")
def fixture_consumer_factory(
    kafka_bootstrap: str, kafka_consumer_settings: dict[str, Any]
) -> Iterator[Callable[..., KafkaConsumer]]:
    consumers: list[KafkaConsumer] = []

    def make(topic: str, group: str) -> KafkaConsumer:
        consumer = KafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, group_id=group, **kafka_consumer_settings
        )
        consumers.append(consumer)
        return consumer

    try:
        yield make
    finally:
        for consumer in consumers:
            consumer.close()


def _drain(consumer: KafkaConsumer, expected: int, timeout_seconds: float = 60.0) -> list[Any]:
    """Poll until `expected` records arrived; return them."""
    records: list[Any] = []

    def enough() -> bool:
        for batch in consumer.poll(timeout_ms=POLL_MS).values():
            records.extend(batch)
        return len(records) >= expected

    wait_until(enough, timeout_seconds, message=f"{expected} records (have {len(records)})")
    return records


def test_zstd_codec_is_available() -> None:
    # kafka-python compresses zstd through the `zstandard` module (its `zstd` extra).
    assert has_zstd()


def test_keyed_zstd_messages_reach_a_consumer_group_in_key_order(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str,
    consumer_factory: Callable[..., KafkaConsumer],
) -> None:  # fmt: skip
    topic = fresh_topic(partitions=4)
    produced = _produce(kafka_bootstrap, topic)
    consumer = consumer_factory(topic, consumer_group)

    records = _drain(consumer, MESSAGES)
    consumer.commit()

    assert sorted(_number(r) for r in records) == list(range(MESSAGES))
    assert len(produced) == 4, "37 keys should spread over all 4 partitions"
    for partition, numbers in produced.items():
        # Within a partition, the broker keeps the producer's order.
        got = [
            _number(r) for r in sorted(records, key=lambda r: r.offset) if r.partition == partition
        ]
        assert got == numbers
    keys_per_partition = {(r.key, r.partition) for r in records}
    assert len(keys_per_partition) == KEYS, "each key must land in exactly one partition"


def test_restarted_consumer_resumes_at_the_committed_offsets(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str,
    consumer_factory: Callable[..., KafkaConsumer],
) -> None:  # fmt: skip
    topic = fresh_topic(partitions=3)
    _produce(kafka_bootstrap, topic)
    first = consumer_factory(topic, consumer_group)
    # Process (and commit) only the first 400 records received, though more may have arrived.
    processed = _drain(first, 400)[:400]
    committed: dict[TopicPartition, int] = {}
    for record in processed:
        tp = TopicPartition(record.topic, record.partition)
        committed[tp] = max(committed.get(tp, 0), record.offset + 1)
    first.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in committed.items()})
    first.close()

    second = consumer_factory(topic, consumer_group)
    rest = _drain(second, MESSAGES - len(processed))

    first_offsets: dict[int, int] = {}
    for record in rest:
        first_offsets.setdefault(record.partition, record.offset)
        first_offsets[record.partition] = min(first_offsets[record.partition], record.offset)
    for tp, offset in committed.items():
        assert first_offsets.get(tp.partition, offset) == offset
    for partition in {r.partition for r in rest} - {tp.partition for tp in committed}:
        assert first_offsets[partition] == 0
    numbers = [_number(r) for r in processed + rest]
    assert sorted(numbers) == list(range(MESSAGES)), "nothing lost, nothing consumed twice"


def test_two_consumers_in_one_group_split_the_partitions(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str,
    consumer_factory: Callable[..., KafkaConsumer],
) -> None:  # fmt: skip
    topic = fresh_topic(partitions=4)
    a = consumer_factory(topic, consumer_group)
    b = consumer_factory(topic, consumer_group)
    received: dict[str, list[Any]] = {"a": [], "b": []}

    def poll_both() -> int:
        for name, consumer in (("a", a), ("b", b)):
            for batch in consumer.poll(timeout_ms=POLL_MS).values():
                received[name].extend(batch)
        return len(received["a"]) + len(received["b"])

    def balanced() -> bool:
        poll_both()
        left = {tp.partition for tp in a.assignment()}
        right = {tp.partition for tp in b.assignment()}
        return bool(left) and bool(right) and not left & right and left | right == {0, 1, 2, 3}

    wait_until(balanced, 60, message="both consumers to own a share of the partitions")
    _produce(kafka_bootstrap, topic)
    wait_until(
        lambda: poll_both() >= MESSAGES,
        60,
        message="all records across the two consumers",
    )

    owned = {name: {tp.partition for tp in c.assignment()} for name, c in (("a", a), ("b", b))}
    for name, records in received.items():
        assert records, f"consumer {name} received nothing"
        assert {r.partition for r in records} <= owned[name]
    numbers = sorted(_number(r) for r in received["a"] + received["b"])
    assert numbers == list(range(MESSAGES))


def test_prometheus_scrapes_a_prometheus_client_endpoint(prometheus: PrometheusService) -> None:
    registry = CollectorRegistry()
    Counter("headwatch_harness_probes", "probes served", registry=registry).inc(7)
    Gauge("headwatch_harness_level_ratio", "a level", ["region"], registry=registry).labels(
        region="sink"
    ).set(0.25)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    job = unique_name("harness")
    try:
        prometheus.add_scrape_target(job, f"127.0.0.1:{server.server_port}")
        counter = wait_until(
            lambda: query_values(prometheus.url, f'headwatch_harness_probes_total{{job="{job}"}}'),
            30,
            message="the counter in Prometheus",
        )
        gauge = query_values(
            prometheus.url, f'headwatch_harness_level_ratio{{job="{job}",region="sink"}}'
        )
    finally:
        prometheus.remove_scrape_target(job)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert counter == [7.0]
    assert gauge == [0.25]


def test_prometheus_sends_alerts_to_the_alertmanager(
    prometheus: PrometheusService, alertmanager: AlertmanagerService
) -> None:
    def known() -> list[str]:
        active = prometheus_api(prometheus.url, "alertmanagers")["activeAlertmanagers"]
        return [item["url"] for item in active if item["url"].startswith(alertmanager.url)]

    assert wait_until(known, 30, message="Prometheus to discover the Alertmanager")


class _WebhookSink(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the default handler writes every request to stderr."""


def test_alertmanager_notifies_the_webhook_tests_set(alertmanager: AlertmanagerService) -> None:
    received: list[dict[str, Any]] = []
    handler = type("Sink", (_WebhookSink,), {"received": received})
    sink = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=sink.serve_forever, daemon=True)
    thread.start()
    alertname = unique_name("HarnessProbe")
    try:
        alertmanager.set_webhook(f"http://127.0.0.1:{sink.server_port}/alerts")
        alertmanager.post_alert({"alertname": alertname, "severity": "info"})
        wait_until(
            lambda: any(
                alert["labels"].get("alertname") == alertname
                for payload in received
                for alert in payload["alerts"]
            ),
            30,
            message=f"a webhook notification for {alertname}",
        )
    finally:
        alertmanager.set_webhook(None)
        sink.shutdown()
        sink.server_close()
        thread.join(timeout=5)


@pytest.mark.slow
def test_a_restarted_broker_keeps_its_address_topics_and_committed_offsets(
    stack_paths: StackPaths, tmp_path: Path, kafka_consumer_settings: dict[str, Any]
) -> None:
    # A broker of this test's own: restarting the session's would disturb other tests.
    settings = StackSettings(kafka_port=0, kafka_controller_port=0)
    stack = LocalStack(settings, stack_paths, tmp_path, die_with_parent=True)
    try:
        bootstrap = stack.start_kafka().bootstrap
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("restart_probe", num_partitions=2, replication_factor=1)])
        admin.close()
        first = _produce(bootstrap, "restart_probe", 100)
        before = KafkaConsumer("restart_probe", bootstrap_servers=bootstrap, group_id="probe",
                               **kafka_consumer_settings)  # fmt: skip
        assert len(_drain(before, 100)) == 100
        before.commit()
        before.close()

        assert stack.restart_kafka().bootstrap == bootstrap
        _produce(bootstrap, "restart_probe", 10)
        after = KafkaConsumer("restart_probe", bootstrap_servers=bootstrap, group_id="probe",
                              **kafka_consumer_settings)  # fmt: skip
        try:
            resumed = _drain(after, 10)
        finally:
            after.close()
    finally:
        stack.stop()
    # Only the 10 new messages (numbered from 0 again): the first 100 stayed committed, and each
    # partition's offsets continue where its share of the first 100 ended.
    assert sorted(_number(r) for r in resumed) == list(range(10))
    for partition in {r.partition for r in resumed}:
        assert min(r.offset for r in resumed if r.partition == partition) == len(first[partition])
