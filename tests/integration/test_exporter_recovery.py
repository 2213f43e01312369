"""Faults: SIGKILL mid-stream and restart, then a broker restart under load."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from exporter.deadletter import REASON_HEADER, SOURCE_HEADER
from tests.factories import MessageFactory, pattern_probs
from tests.helpers import unique_name, wait_until
from tests.integration.conftest_exporter import (
    ExporterProcess,
    Series,
    delete_side_topics,
    exporters,
    model_series,
    produce,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 900


def _messages(total: int, seed: int = 4) -> list[Any]:
    factory = MessageFactory(
        layers=4, heads=8, kv_heads=4, probs=pattern_probs(4, 8, [1, 4, 1, 1, 1, 1, 1]), seed=seed
    )
    t0 = time.time()
    return [factory.message(timestamp_seconds=t0 + i * 0.001) for i in range(total)]


def _committed(bootstrap: str, group: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        return sum(meta.offset for meta in admin.list_group_offsets(group)[group].values())
    finally:
        admin.close()


MESSAGES = "headwatch_exporter_messages_total"
INVALID = "headwatch_exporter_invalid_messages_total"
DEAD_LETTERS = "headwatch_exporter_dead_letters_total"
# A gauge of what the replica folded, committed or not: the newest message's producer timestamp.
NEWEST = "headwatch_model_last_message_timestamp_seconds"


def _with_poison(messages: list[Any], poison: list[bytes], first: int, every: int) -> list[Any]:
    """Return `messages` with a poison record before messages[first], [first + every], ..."""
    feed: list[Any] = []
    for i, message in enumerate(messages):
        slot, rest = divmod(i - first, every)
        if i >= first and rest == 0 and slot < len(poison):
            feed.append(poison[slot])
        feed.append(message)
    return feed


def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Return every record of a one-partition topic, up to its end offset now."""
    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    records: list[Any] = []
    try:
        reader.assign([tp])
        reader.seek_to_beginning(tp)
        end = reader.end_offsets([tp])[tp]

        def drained() -> bool:
            for batch in reader.poll(timeout_ms=500).values():
                records.extend(batch)
            return bool(reader.position(tp) >= end)

        wait_until(drained, 30, 0.0, f"{topic} read up to offset {end}")
        return [r for r in records if r.offset < end]
    finally:
        reader.close()


def _observed(series: Series) -> dict[str, float]:
    """Return the replica's own counters (summed over `reason`) and the newest message folded."""
    seen = {
        counter: sum(v for (name, _), v in series.items() if name == counter)
        for counter in (MESSAGES, INVALID, DEAD_LETTERS)
    }
    seen[NEWEST] = series.get((NEWEST, frozenset({("model_name", "tiny-llama")})), 0.0)
    return seen


class _Exposure:
    """The most a replica's /metrics ever showed (see `_observed`), scraped from a thread until
    the block ends; scrapes that fail (not serving yet, or killed) are skipped."""

    def __init__(self, replica: ExporterProcess, interval_seconds: float = 0.01) -> None:
        self._replica = replica
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._most = dict.fromkeys((MESSAGES, INVALID, DEAD_LETTERS, NEWEST), 0.0)
        self._thread = threading.Thread(target=self._scrape, daemon=True)

    def __enter__(self) -> _Exposure:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def most(self, name: str) -> float:
        with self._lock:
            return self._most[name]

    def _scrape(self) -> None:
        while not self._stop.is_set():
            try:
                seen = _observed(self._replica.series())
            except (OSError, http.client.HTTPException, AssertionError):
                pass
            else:
                with self._lock:
                    for name, value in seen.items():
                        self._most[name] = max(self._most[name], value)
            self._stop.wait(self._interval)


def _head_view(replica: ExporterProcess) -> dict[Any, float]:
    """Everything per model except the counters, which depend on who counted what."""
    return {
        k: v
        for k, v in model_series(replica.series()).items()
        if not k[0].startswith(("headwatch_model_messages", "headwatch_model_context_tokens"))
    }


def test_sigkill_then_restart_loses_nothing_and_counts_nothing_twice(
    kafka_bootstrap: str,
    fresh_topic: Callable[..., str],
    consumer_group: str,
    kafka_admin: Any,
    tmp_path: Path,
) -> None:
    """The kill lands while the replica has folded and counted messages it cannot commit: its
    dead-letter topic refuses the letters (max.message.bytes), so the outbox holds every commit
    at the first poison record until it gives the letter up after 5 sends, one per loop turn.
    The held part is one small produce (one fetch, one turn) and the idle turns wait out a 5 s
    poll timeout: the kill comes about 20 s before the letter could be given up."""
    from tests.unit.test_exporter_fuzz import CASES, EXPECTED

    topic = fresh_topic(partitions=1)
    held_dlq = fresh_topic(partitions=1, configs={"max.message.bytes": "16"})
    fresh_dlq = fresh_topic(partitions=1)  # the fresh replica's letters stay out of held_dlq
    poison = {
        value: EXPECTED.get(case, case) for case, value in CASES.items() if case != "oversized"
    }
    messages = _messages(TOTAL)
    feed = _with_poison(messages, list(poison), first=100, every=60)
    produced = len(feed)
    # the first poison record and the 10 messages after it: one producer batch (< 16 KiB)
    held_end = 111
    assert feed[100] in poison and feed[held_end - 1] is messages[109]
    try:
        first = ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path,
                                HEADWATCH_EXPORTER_KAFKA__DEAD_LETTER_TOPIC=held_dlq,
                                HEADWATCH_EXPORTER_KAFKA__POLL_TIMEOUT_MS="5000")  # fmt: skip
        with exporters(first):
            first.wait_healthy(partitions=1)
            with _Exposure(first) as exposed:
                produce(kafka_bootstrap, topic, feed[:100])
                wait_until(lambda: exposed.most(MESSAGES) >= 100, 60, 0.01, "100 committed")
                produce(kafka_bootstrap, topic, feed[100:held_end], key=b"poison")
                wait_until(lambda: exposed.most(NEWEST) > messages[108].timestamp_seconds,
                           60, 0.01, "110 messages folded")  # fmt: skip
                first.kill()
        committed_at_kill = _committed(kafka_bootstrap, consumer_group)
        produce(kafka_bootstrap, topic, feed[held_end:], key=b"poison")  # after the kill
        offsets = [r.offset for r in _read_all(kafka_bootstrap, topic) if r.key == b"poison"]
        assert len(offsets) == len(poison)
        poison_before = sum(offset < committed_at_kill for offset in offsets)
        # Counts become visible only once their offsets commit, so what the killed replica
        # exposed (its last scrape may predate the kill, which only lowers it) is committed...
        assert exposed.most(MESSAGES) <= committed_at_kill
        assert exposed.most(INVALID) <= poison_before
        assert exposed.most(DEAD_LETTERS) <= poison_before
        # ...while the refused letter held every commit at its record
        assert committed_at_kill == offsets[0] == 100
        kafka_admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, held_dlq, configs={"max.message.bytes": "1048588"}
                )
            ]
        )
        restarted = ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path,
                                    HEADWATCH_EXPORTER_KAFKA__DEAD_LETTER_TOPIC=held_dlq)  # fmt: skip
        fresh = ExporterProcess(kafka_bootstrap, topic, unique_name("group", "fresh"), tmp_path,
                                HEADWATCH_EXPORTER_KAFKA__DEAD_LETTER_TOPIC=fresh_dlq)  # fmt: skip
        with exporters(restarted, fresh):
            restarted.wait_messages(produced - committed_at_kill)
            fresh.wait_messages(produced)
            after = _observed(restarted.series())
            # what Prometheus sums over both replicas counts no message twice
            assert exposed.most(MESSAGES) + after[MESSAGES] <= produced
            assert exposed.most(INVALID) + after[INVALID] <= len(poison)
            assert exposed.most(DEAD_LETTERS) + after[DEAD_LETTERS] <= len(poison)
            # the restarted replica counted exactly the messages its predecessor had not committed
            assert after[MESSAGES] == produced - committed_at_kill
            assert after[INVALID] == after[DEAD_LETTERS] == len(poison) - poison_before
            assert restarted.value(
                "headwatch_model_messages_total", model_name="tiny-llama"
            ) == produced - committed_at_kill - (len(poison) - poison_before)
            assert restarted.value("headwatch_exporter_duplicate_messages_total") == 0
            assert (
                restarted.value("headwatch_exporter_writes_abandoned_total", kind="dead_letter")
                == 0
            )
            # ...and exports exactly what a replica that never restarted exports
            assert fresh.value("headwatch_model_messages_total", model_name="tiny-llama") == TOTAL
            assert _head_view(restarted) == _head_view(fresh)
            assert (
                restarted.value("headwatch_model_reference_samples", model_name="tiny-llama") == 64
            )
            assert (restarted.value("headwatch_exporter_rebuild_seconds") or 0) > 0
        # every poison record reached the dead-letter topic, with its reason
        letters = _read_all(kafka_bootstrap, held_dlq)
        sources = {dict(r.headers)[SOURCE_HEADER].decode() for r in letters}
        assert sources == {f"{topic}[0]@{offset}" for offset in offsets}
        assert all(dict(r.headers)[REASON_HEADER].decode() == poison[r.value] for r in letters)
        assert {r.value for r in letters} == set(poison)
    finally:
        delete_side_topics(kafka_bootstrap, topic)


@pytest.fixture(name="own_broker")
def fixture_own_broker(stack_paths: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker of this test's own (the session's is shared), which the test may stop and start."""
    from headwatch.localstack.kafka import BROKER_CLASS, broker_answers, java_command, start_kafka
    from headwatch.localstack.kafka_fetch import fetch_kafka
    from headwatch.localstack.process import spawn, stop
    from headwatch.localstack.readiness import wait_ready
    from headwatch.localstack.settings import StackSettings
    from headwatch.localstack.tools import require_java

    settings = StackSettings(
        kafka_port=0, kafka_controller_port=0, strict_ports=False, kafka_heap="256m"
    )
    java, dist = require_java(), fetch_kafka(stack_paths)
    run_dir = tmp_path_factory.mktemp("own-broker")
    broker = start_kafka(dist, java, stack_paths, run_dir, settings, die_with_parent=True)
    state = {"handle": broker.process}

    def restart(down_seconds: float) -> None:
        stop(state["handle"], settings.stop_timeout_seconds)
        time.sleep(down_seconds)  # the outage itself, not a wait for a condition
        kafka_dir = run_dir / "kafka"
        argv = java_command(java, dist, stack_paths.deploy_dir / "log4j2.properties", settings.kafka_heap,
                            BROKER_CLASS, str(kafka_dir / "server.properties"))  # fmt: skip
        state["handle"] = spawn(
            "kafka", argv, kafka_dir / "kafka.log", cwd=kafka_dir, die_with_parent=True
        )
        wait_ready(
            state["handle"],
            lambda: broker_answers(broker.bootstrap),
            settings.start_timeout_seconds,
        )

    try:
        yield broker.bootstrap, restart
    finally:
        stop(state["handle"], settings.stop_timeout_seconds)


def test_broker_restart_under_load(own_broker: Any, tmp_path: Path) -> None:
    bootstrap, restart = own_broker
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    from kafka.admin import NewTopic

    admin.create_topics([NewTopic("headwatch.head-stats.v1", 2, 1)])
    admin.close()
    messages = _messages(600, seed=12)
    replica = ExporterProcess(bootstrap, "headwatch.head-stats.v1", "restart-group", tmp_path)
    with exporters(replica):
        replica.wait_healthy(partitions=2)
        produce(bootstrap, replica.topic, messages[:300])
        wait_until(
            lambda: (replica.value("headwatch_exporter_messages_total") or 0) > 0,
            60,
            0.05,
            "consuming",
        )
        served_during_outage: list[int] = []
        stop_probe = threading.Event()

        def probe() -> None:
            while not stop_probe.is_set():
                try:
                    served_during_outage.append(replica.get("/metrics")[0])
                except OSError:
                    served_during_outage.append(0)
                stop_probe.wait(0.2)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            restart(3.0)
        finally:
            stop_probe.set()
            prober.join()
        assert served_during_outage and set(served_during_outage) == {200}
        produce(bootstrap, replica.topic, messages[300:])
        replica.wait_messages(600, timeout_seconds=120)
        assert replica.value("headwatch_model_messages_total", model_name="tiny-llama") == 600
        assert replica.value("headwatch_model_window_samples", model_name="tiny-llama") == 64
        assert replica.health()["status"] == 200
        replica.check_running()
