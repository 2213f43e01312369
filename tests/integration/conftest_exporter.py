"""Exporter test support: run `python -m exporter` against the real broker, read its /metrics.

Imported by the exporter integration tests (not a pytest conftest: nothing here is collected).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.partitioner.default import murmur2
from prometheus_client.parser import text_string_to_metric_families

from collector.schema import HeadStatsMessage
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Small windows so that tests fill them with hundreds of messages, and fast group joins.
TEST_ENV = {
    "HEADWATCH_EXPORTER_WINDOW__SAMPLES": "64",
    "HEADWATCH_EXPORTER_WINDOW__EVALUATE_EVERY_SAMPLES": "16",
    "HEADWATCH_EXPORTER_DRIFT__WINDOW_SAMPLES": "32",
    "HEADWATCH_EXPORTER_DRIFT__MIN_HEAD_SAMPLES": "16",
    "HEADWATCH_EXPORTER_DRIFT__REFERENCE_SAMPLES": "64",
    "HEADWATCH_EXPORTER_VERDICTS__MIN_SAMPLES": "16",
    "HEADWATCH_EXPORTER_KAFKA__SESSION_TIMEOUT_MS": "6000",
    "HEADWATCH_EXPORTER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
    "HEADWATCH_EXPORTER_KAFKA__METADATA_MAX_AGE_MS": "5000",
    "HEADWATCH_EXPORTER_KAFKA__FETCH_MAX_WAIT_MS": "100",
    "HEADWATCH_EXPORTER_KAFKA__POLL_TIMEOUT_MS": "1000",
    "HEADWATCH_EXPORTER_KAFKA__REQUEST_TIMEOUT_MS": "15000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_series(text: str) -> Series:
    """Return {(sample name, labels): value} of an exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class ExporterProcess:
    """One exporter replica as a subprocess (`python -m exporter serve`)."""

    def __init__(self, bootstrap: str, topic: str, group: str, log_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.topic = topic
        self.env = {
            **os.environ,
            **TEST_ENV,
            "PYTHONPATH": str(REPO),
            "HEADWATCH_EXPORTER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "HEADWATCH_EXPORTER_KAFKA__TOPIC": topic,
            "HEADWATCH_EXPORTER_KAFKA__DEAD_LETTER_TOPIC": f"{topic}.dlq",
            "HEADWATCH_EXPORTER_KAFKA__REFERENCE_TOPIC": f"{topic}.reference",
            "HEADWATCH_EXPORTER_KAFKA__GROUP_ID": group,
            "HEADWATCH_EXPORTER_HTTP__PORT": str(self.port),
            **env,
        }
        self.log_path = log_dir / f"exporter-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ExporterProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            cwd=REPO,
        )  # fmt: skip
        log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def health(self) -> dict[str, Any]:
        status, body = self.get("/healthz")
        facts: dict[str, Any] = json.loads(body)
        facts["status"] = status
        return facts

    def series(self) -> Series:
        status, body = self.get("/metrics")
        assert status == 200, body[:200]
        return parse_series(body.decode())

    def value(self, name: str, **labels: str) -> float | None:
        return self.series().get((name, frozenset(labels.items())))

    def wait_healthy(
        self, partitions: int | None = None, timeout_seconds: float = 60.0
    ) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            self.check_running()
            facts = self.health()
            if facts["status"] != 200 or facts.get("rebuilding"):
                return None
            if partitions is not None and facts["assigned_partitions"] != partitions:
                return None
            return facts

        return wait_until(
            ready, timeout_seconds, 0.2, f"exporter healthy on {self.url}", ignore=(OSError,)
        )

    def wait_messages(self, total: int, timeout_seconds: float = 90.0) -> None:
        """Wait until this replica's exporter_messages_total reaches `total` (committed)."""
        wait_until(
            lambda: self.check_running() or (self.value("headwatch_exporter_messages_total") or 0) >= total,
            timeout_seconds, 0.2, f"{total} messages on {self.url}", ignore=(OSError,),
        )  # fmt: skip

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"exporter exited with {self.proc.returncode}:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


@contextlib.contextmanager
def exporters(*replicas: ExporterProcess) -> Iterator[tuple[ExporterProcess, ...]]:
    """Start replicas and stop them (SIGTERM) at the end, whatever happens."""
    try:
        for replica in replicas:
            replica.start()
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def delete_side_topics(bootstrap: str, topic: str) -> None:
    """Delete the dead-letter and reference topics the exporter created for `topic`."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        side = [t for t in (f"{topic}.dlq", f"{topic}.reference") if t in set(admin.list_topics())]
        if side:
            admin.delete_topics(side)
    finally:
        admin.close()


def produce(
    bootstrap: str,
    topic: str,
    messages: Iterable[HeadStatsMessage | bytes],
    key: bytes | None = None,
) -> int:
    """Send messages keyed by model identity (as the collector does); return how many were acked."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 << 20
    )
    try:
        futures = []
        for m in messages:
            if isinstance(m, HeadStatsMessage):
                futures.append(
                    producer.send(topic, key=m.model_key.encode(), value=m.to_bytes(),
                                  timestamp_ms=int(m.timestamp_seconds * 1000))
                )  # fmt: skip
            else:
                futures.append(producer.send(topic, key=key, value=m))
        producer.flush(timeout=60)
        return sum(1 for f in futures if f.get(timeout=30) is not None)
    finally:
        producer.close()


def partition_of(key: str, partitions: int) -> int:
    """Return the partition kafka-python's default partitioner picks for `key`."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def model_series(series: Series) -> Series:
    """Drop the replica's self-metrics: what remains describes models only."""
    return {k: v for k, v in series.items() if not k[0].startswith("headwatch_exporter_")}


def now() -> float:
    return time.time()
