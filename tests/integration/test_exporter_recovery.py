"""Faults: SIGKILL mid-stream and restart, then a broker restart under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient

from tests.factories import MessageFactory, pattern_probs
from tests.helpers import unique_name, wait_until
from tests.integration.conftest_exporter import (
    ExporterProcess,
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


def _head_view(replica: ExporterProcess) -> dict[Any, float]:
    """Everything per model except the counters, which depend on who counted what."""
    return {
        k: v
        for k, v in model_series(replica.series()).items()
        if not k[0].startswith(("headwatch_model_messages", "headwatch_model_context_tokens"))
    }


def test_sigkill_then_restart_loses_nothing_and_counts_nothing_twice(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str, tmp_path: Path
) -> None:
    topic = fresh_topic(partitions=1)
    messages = _messages(TOTAL)
    feeder = threading.Thread(
        target=lambda: [
            produce(kafka_bootstrap, topic, messages[i : i + 50]) for i in range(0, TOTAL, 50)
        ]
    )
    try:
        first = ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path)
        with exporters(first):
            first.wait_healthy(partitions=1)
            feeder.start()
            wait_until(
                lambda: (first.value("headwatch_exporter_messages_total") or 0) >= 200,
                60,
                0.05,
                "200 consumed",
            )
            first.kill()  # mid-stream: the feeder is still producing
        committed_at_kill = _committed(kafka_bootstrap, consumer_group)
        assert 200 <= committed_at_kill < TOTAL
        feeder.join(timeout=120)
        restarted = ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path)
        fresh = ExporterProcess(kafka_bootstrap, topic, unique_name("group", "fresh"), tmp_path)
        with exporters(restarted, fresh):
            restarted.wait_messages(TOTAL - committed_at_kill)
            fresh.wait_messages(TOTAL)
            # the restarted replica counted exactly the messages its predecessor had not committed
            assert restarted.value("headwatch_exporter_messages_total") == TOTAL - committed_at_kill
            assert (
                restarted.value("headwatch_model_messages_total", model_name="tiny-llama")
                == TOTAL - committed_at_kill
            )
            assert restarted.value("headwatch_exporter_duplicate_messages_total") == 0
            # ...and exports exactly what a replica that never restarted exports
            assert fresh.value("headwatch_model_messages_total", model_name="tiny-llama") == TOTAL
            assert _head_view(restarted) == _head_view(fresh)
            assert (
                restarted.value("headwatch_model_reference_samples", model_name="tiny-llama") == 64
            )
            assert (restarted.value("headwatch_exporter_rebuild_seconds") or 0) > 0
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
