"""Shared helpers of the exporter benchmarks: a broker, messages, bounds and results (no torch)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BOUNDS = HERE / "bounds.json"
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """Yield a real broker: the given one, HEADWATCH_TEST_KAFKA_BOOTSTRAP, or one started here."""
    given = bootstrap or os.environ.get("HEADWATCH_TEST_KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    from headwatch.localstack.paths import find_paths
    from headwatch.localstack.settings import StackSettings
    from headwatch.localstack.stack import LocalStack

    settings = StackSettings(kafka_port=0, kafka_controller_port=0, strict_ports=False)
    with tempfile.TemporaryDirectory(prefix="hw-bench-") as run_dir:
        stack = LocalStack(
            settings, find_paths(settings.cache_dir), Path(run_dir), die_with_parent=True
        )
        try:
            yield stack.start_kafka().bootstrap
        finally:
            stack.stop()


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def produce_raw(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, int]]) -> float:
    """Send (key, value, timestamp_ms) records; return the seconds it took (not part of any figure)."""
    from kafka import KafkaProducer

    started = time.perf_counter()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=1 << 20,
                             max_request_size=4 << 20)  # fmt: skip
    try:
        for key, value, ts in records:
            producer.send(topic, key=key, value=value, timestamp_ms=ts)
        producer.flush(timeout=600)
    finally:
        producer.close()
    return time.perf_counter() - started


def read_all(bootstrap: str, topic: str) -> float:
    """Read every record of `topic` once with a plain consumer; return the seconds it took.

    Warms a freshly started broker's fetch path (a cold JVM compiles it on first use, on the same
    two cores the exporter runs on) so a timed run measures the exporter, not the broker's JIT.
    """
    from kafka import KafkaConsumer, TopicPartition

    started = time.perf_counter()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=100, max_partition_fetch_bytes=8 << 20)  # fmt: skip
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            consumer.poll(timeout_ms=1000, max_records=1000)
    finally:
        consumer.close()
    return time.perf_counter() - started


def rss_mib() -> float:
    """Return the resident set size of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def service_settings(bootstrap: str, topic: str, group: str, **overrides: Any) -> Any:
    """Return ExporterSettings for an in-process ConsumerService against `topic`."""
    from exporter.settings import ExporterSettings, KafkaSettings

    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic=topic, dead_letter_topic=f"{topic}.dlq",
                          reference_topic=f"{topic}.reference", group_id=group, session_timeout_ms=6000,
                          heartbeat_interval_ms=1000, fetch_max_wait_ms=100, **overrides)  # fmt: skip
    return ExporterSettings(kafka=kafka)


def run_service(settings: Any) -> tuple[Any, threading.Event, threading.Thread]:
    """Start a ConsumerService (the code `headwatch exporter serve` runs) in a thread."""
    from exporter.consume import ConsumerService

    service = ConsumerService(settings.kafka, settings.aggregate_policy())
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    return service, stop, thread


def report(name: str, result: dict[str, Any], save: bool) -> int:
    """Print the result, compare it with the committed bounds, optionally save it; return the exit status."""
    bounds = json.loads(BOUNDS.read_text()).get(name, {})
    failures = []
    for key, limit in bounds.items():
        metric, _, kind = key.rpartition("_")
        if metric in result and (
            (kind == "max" and result[metric] > limit) or (kind == "min" and result[metric] < limit)
        ):
            failures.append(f"{metric}={result[metric]} outside {kind} {limit}")
    cpu = f"cpu ({platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
    text = json.dumps(
        {"benchmark": name, "device": cpu, **result, "bounds": bounds, "failures": failures},
        indent=2,
    )
    print(text)
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(text + "\n")
    return 1 if failures else 0
