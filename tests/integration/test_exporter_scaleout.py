"""Scale-out: two replicas in one group split the partitions; their /metrics union equals one replica's."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.factories import MessageFactory, pattern_probs
from tests.helpers import unique_name, wait_until
from tests.integration.conftest_exporter import (
    ExporterProcess,
    delete_side_topics,
    exporters,
    model_series,
    partition_of,
    produce,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4
PER_MODEL = 120
CONFIG_HASH = "0123456789abcdef"


def _models() -> list[str]:
    """Model names whose keys land on every partition (two models on each)."""
    names: list[str] = []
    per_partition = dict.fromkeys(range(PARTITIONS), 0)
    i = 0
    while any(n < 2 for n in per_partition.values()):
        name = f"model-{i}"
        p = partition_of(f"{name}@{CONFIG_HASH}", PARTITIONS)
        if per_partition[p] < 2:
            per_partition[p] += 1
            names.append(name)
        i += 1
    return names


def test_two_replicas_union_equals_one_replica(
    kafka_bootstrap: str, fresh_topic: Callable[..., str], consumer_group: str, tmp_path: Path
) -> None:
    topic = fresh_topic(partitions=PARTITIONS)
    names = _models()
    mixes = ([1, 4, 1, 1, 1, 1, 1], [0, 1, 3, 3, 0, 0, 0], "v_shaped", "recency")
    factories = [
        MessageFactory(
            layers=3,
            heads=8,
            kv_heads=4,
            model_name=name,
            seed=i,
            probs=pattern_probs(3, 8, mixes[i % len(mixes)]),
        )
        for i, name in enumerate(names)
    ]
    t0 = time.time()
    messages = [
        f.message(timestamp_seconds=t0 + i * 0.001) for i in range(PER_MODEL) for f in factories
    ]
    total = len(messages)
    try:
        a = ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path)
        b = ExporterProcess(kafka_bootstrap, topic, consumer_group, tmp_path)
        with exporters(a, b):
            wait_until(
                lambda: a.health()["assigned_partitions"] + b.health()["assigned_partitions"] == PARTITIONS
                and min(a.health()["assigned_partitions"], b.health()["assigned_partitions"]) >= 1,
                90, 0.2, "both replicas to own partitions", ignore=(OSError, KeyError),
            )  # fmt: skip
            assert produce(kafka_bootstrap, topic, messages) == total
            wait_until(
                lambda: (a.value("headwatch_exporter_messages_total") or 0)
                + (b.value("headwatch_exporter_messages_total") or 0) == total,
                120, 0.2, "the two replicas to consume everything",
            )  # fmt: skip
            series_a, series_b = model_series(a.series()), model_series(b.series())
        single = ExporterProcess(kafka_bootstrap, topic, unique_name("group", "single"), tmp_path)
        with exporters(single):
            single.wait_messages(total, timeout_seconds=120)
            series_one = model_series(single.series())
        models_a = {dict(labels).get("model_name") for _, labels in series_a} - {None}
        models_b = {dict(labels).get("model_name") for _, labels in series_b} - {None}
        assert models_a and models_b and not models_a & models_b
        assert models_a | models_b == set(names)
        assert series_a.keys().isdisjoint(series_b.keys())
        assert {**series_a, **series_b} == series_one
    finally:
        delete_side_topics(kafka_bootstrap, topic)
