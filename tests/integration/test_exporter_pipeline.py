"""The exporter on the real broker, scraped by a real Prometheus; poison messages go to the DLQ."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer

from exporter.labels import safe_label
from exporter.patterns import PATTERNS
from tests.factories import MessageFactory, pattern_probs
from tests.helpers import PrometheusService, query_values, unique_name, wait_until
from tests.integration.conftest_exporter import (
    ExporterProcess,
    delete_side_topics,
    exporters,
    produce,
)

pytestmark = pytest.mark.integration

PER_LAYER = ("uniform", "scattered_middle", "recency", "concentrated_middle")


def _layered(model_name: str, seed: int) -> MessageFactory:
    """4 layers x 8 heads, one pattern per layer (as in the study: uniform early, mixed later)."""
    probs = np.concatenate([pattern_probs(1, 8, p) for p in PER_LAYER])
    return MessageFactory(
        layers=4, heads=8, kv_heads=4, probs=probs, model_name=model_name, seed=seed
    )


def test_consumes_classifies_and_prometheus_scrapes(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str, prometheus: PrometheusService,
    tmp_path: Path,
) -> None:  # fmt: skip
    topic = fresh_topic(partitions=2)
    weird = 'llama "3"\nq4'
    v_shaped = MessageFactory(layers=4, heads=8, kv_heads=4, probs=pattern_probs(4, 8, "v_shaped"),
                              model_name="vshape-7b", seed=1)  # fmt: skip
    factories = [v_shaped, _layered("layered-7b", 2), _layered(weird, 3)]
    t0 = time.time()
    messages = [f.message(timestamp_seconds=t0 + i * 0.001) for i in range(150) for f in factories]
    job = unique_name("exporter")
    try:
        with exporters(ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path)) as (
            replica,
        ):
            replica.wait_healthy(partitions=2)
            assert produce(kafka_bootstrap, topic, messages) == 450
            replica.wait_messages(450)
            get = replica.value
            assert get("headwatch_model_messages_total", model_name="vshape-7b") == 150
            assert (
                get("headwatch_model_pattern_heads", model_name="layered-7b", pattern="recency")
                == 8
            )
            assert (
                get("headwatch_model_pattern_heads", model_name="vshape-7b", pattern="v_shaped")
                == 32
            )
            assert get("headwatch_model_kv_heads_safe", model_name="vshape-7b") == 16
            # layered: only the recency layer's 4 KV heads are safe
            assert get("headwatch_model_kv_heads_safe", model_name="layered-7b") == 4
            prometheus.add_scrape_target(job, f"127.0.0.1:{replica.port}")
            url = prometheus.url
            wait_until(lambda: query_values(url, f'headwatch_model_messages_total{{job="{job}"}}') == [150.0] * 3,
                       60, 0.5, "Prometheus to scrape the three models")  # fmt: skip
            by_layer = query_values(
                url,
                f'sum by (layer) (headwatch_head_pattern{{job="{job}",model_name="layered-7b"}})',
            )
            assert by_layer == [8.0] * 4
            recency = query_values(
                url,
                f'headwatch_layer_pattern_heads{{job="{job}",model_name="layered-7b",layer="2",pattern="recency"}}',
            )
            assert recency == [8.0]
            reclaimable = query_values(
                url, f'headwatch_model_kv_reclaimable_bytes{{job="{job}",model_name="vshape-7b"}}'
            )
            assert reclaimable == [(4096 - 4 - 64) * 64 * 2 * 2 * 16]
            # the untrusted name arrives intact apart from the newline (and a hash suffix that
            # keeps it distinct from names differing only there), and the target stays up
            names = {
                r["metric"]["model_name"]
                for r in prometheus.query(f'headwatch_model_kv_heads{{job="{job}"}}')
            }
            untrusted = safe_label('llama "3"\nq4', 128)
            assert untrusted.startswith('llama "3"\ufffdq4~')
            assert names == {"vshape-7b", "layered-7b", untrusted}
            assert prometheus.target_health(job) == "up"
            assert set(PATTERNS) >= {
                r["metric"]["pattern"]
                for r in prometheus.query(f'headwatch_head_pattern{{job="{job}"}}')
            }
    finally:
        prometheus.remove_scrape_target(job)
        delete_side_topics(kafka_bootstrap, topic)


def test_poison_messages_are_counted_dead_lettered_and_skipped(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str, tmp_path: Path
) -> None:
    from tests.unit.test_exporter_fuzz import CASES, EXPECTED

    topic = fresh_topic(partitions=1)
    poison = {
        case: value for case, value in CASES.items() if case != "oversized"
    }  # > broker max.message.bytes
    good = MessageFactory(layers=2, heads=4, kv_heads=2, seed=9)
    try:
        with exporters(ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path)) as (
            replica,
        ):
            replica.wait_healthy(partitions=1)
            produce(kafka_bootstrap, topic, [good.message(timestamp_seconds=time.time())])
            produce(kafka_bootstrap, topic, list(poison.values()), key=b"poison")
            produce(kafka_bootstrap, topic, [good.message(timestamp_seconds=time.time())])
            replica.wait_messages(2 + len(poison))
            expected: dict[str, int] = {}
            for case in poison:
                reason = EXPECTED.get(case, case)
                expected[reason] = expected.get(reason, 0) + 1
            for reason, count in expected.items():
                assert (
                    replica.value("headwatch_exporter_invalid_messages_total", reason=reason)
                    == count
                ), reason
            assert replica.value("headwatch_exporter_dead_letters_total") == len(poison)
            assert replica.value("headwatch_model_messages_total", model_name="tiny-llama") == 2
            assert replica.health()["status"] == 200
            dlq = KafkaConsumer(f"{topic}.dlq", bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                                consumer_timeout_ms=10_000)  # fmt: skip
            try:
                records = [r for _, r in zip(range(len(poison)), dlq, strict=False)]
            finally:
                dlq.close()
            reasons = sorted(dict(r.headers)["headwatch-reason"].decode() for r in records)
            assert reasons == sorted(EXPECTED.get(c, c) for c in poison)
            sources = [dict(r.headers)["headwatch-source"].decode() for r in records]
            assert all(s.startswith(f"{topic}[0]@") for s in sources)
            assert {r.value for r in records} == set(poison.values())
    finally:
        delete_side_topics(kafka_bootstrap, topic)


def test_reference_survives_restart_and_rebaseline_replaces_it(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    topic = fresh_topic(partitions=1)
    factory = MessageFactory(
        layers=2, heads=4, kv_heads=2, probs=pattern_probs(2, 4, "v_shaped"), seed=21
    )
    t0 = time.time() - 100
    try:
        replica = ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path)
        with exporters(replica):
            replica.wait_healthy(partitions=1)
            produce(
                kafka_bootstrap,
                topic,
                [factory.message(timestamp_seconds=t0 + i * 0.01) for i in range(80)],
            )
            replica.wait_messages(80)
            assert replica.value("headwatch_model_reference_samples", model_name="tiny-llama") == 64
        # a new group replays only the horizon, yet the reference comes back from the compacted topic
        again = ExporterProcess(kafka_bootstrap, topic, unique_name("group", "again"), tmp_path,
                                HEADWATCH_EXPORTER_WINDOW__HORIZON_SECONDS="30")  # fmt: skip
        with exporters(again):
            again.wait_healthy(partitions=1)
            produce(
                kafka_bootstrap,
                topic,
                [factory.message(timestamp_seconds=time.time() + i * 0.01) for i in range(5)],
            )
            again.wait_messages(5)
            assert again.value("headwatch_model_reference_samples", model_name="tiny-llama") == 64
            assert again.value("headwatch_model_window_samples", model_name="tiny-llama") == 5
            done = subprocess.run(
                [sys.executable, "-m", "exporter", "rebaseline", "--model", "tiny-llama"],
                env=again.env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
            wait_until(lambda: again.value("headwatch_model_reference_samples", model_name="tiny-llama") == 0,
                       30, 0.2, "the reference to be dropped")  # fmt: skip
            produce(
                kafka_bootstrap,
                topic,
                [factory.message(timestamp_seconds=time.time() + 1 + i * 0.01) for i in range(64)],
            )
            wait_until(lambda: again.value("headwatch_model_reference_samples", model_name="tiny-llama") == 64,
                       60, 0.2, "a new reference from the rows after the request")  # fmt: skip
        unknown = subprocess.run(
            [sys.executable, "-m", "exporter", "rebaseline", "--model", "no-such-model"],
            env=again.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert unknown.returncode == 1 and "no-such-model" in unknown.stderr
    finally:
        delete_side_topics(kafka_bootstrap, topic)


@pytest.mark.parametrize("command", [[], ["serve"]], ids=["default", "serve"])
def test_unreachable_broker_at_start_exits_3(tmp_path: Path, command: list[str]) -> None:
    """No subcommand is how the image, compose and Kubernetes start it: the same as `serve`."""
    import subprocess
    import sys

    from tests.integration.conftest_exporter import free_port

    replica = ExporterProcess(f"127.0.0.1:{free_port()}", "t", "g", tmp_path,
                              HEADWATCH_EXPORTER_KAFKA__STARTUP_TIMEOUT_SECONDS="3")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "exporter", *command],
        env=replica.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "broker unavailable" in done.stderr
