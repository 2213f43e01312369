"""Session fixtures: a real Kafka broker, Prometheus and Alertmanager, started only when needed.

Set HEADWATCH_TEST_KAFKA_BOOTSTRAP, HEADWATCH_TEST_PROMETHEUS_URL (+ _TARGETS_DIR) and
HEADWATCH_TEST_ALERTMANAGER_URL (+ _CONFIG) to reuse running services instead;
`headwatch stack up` prints these lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from headwatch.localstack.paths import StackPaths, find_paths
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.stack import LocalStack
from headwatch.localstack.state import (
    ENV_ALERTMANAGER_CONFIG,
    ENV_ALERTMANAGER_URL,
    ENV_KAFKA_BOOTSTRAP,
    ENV_PROMETHEUS_TARGETS_DIR,
    ENV_PROMETHEUS_URL,
)
from tests.helpers import AlertmanagerService, PrometheusService, unique_name, wait_until

logger = logging.getLogger(__name__)

# Group joins in seconds, not tens of seconds: the broker's minimum session timeout is 6s
# (group.min.session.timeout.ms) and it skips the initial rebalance delay (see deploy/local/).
FAST_CONSUMER_SETTINGS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 30000,
    "request_timeout_ms": 15000,
    "fetch_max_wait_ms": 100,
    "metadata_max_age_ms": 5000,
    "auto_offset_reset": "earliest",
    "enable_auto_commit": False,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is not available (torch is imported only then)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session", name="stack_paths")
def fixture_stack_paths() -> StackPaths:
    return find_paths(StackSettings().cache_dir)


@pytest.fixture(scope="session", name="local_stack")
def fixture_local_stack(
    stack_paths: StackPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """The session's own services, on free ports, each started on first use, all stopped at the end."""
    settings = StackSettings(
        kafka_port=0, kafka_controller_port=0, prometheus_port=0, alertmanager_port=0,
        strict_ports=False, alertmanager_webhook_url=None,
    )  # fmt: skip
    # die_with_parent: a killed test session takes its services with it.
    stack = LocalStack(
        settings, stack_paths, tmp_path_factory.mktemp("stack"), die_with_parent=True
    )
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session", name="kafka_bootstrap")
def fixture_kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """host:port of a real Kafka broker (HEADWATCH_TEST_KAFKA_BOOTSTRAP or the session's own)."""
    given = os.environ.get(ENV_KAFKA_BOOTSTRAP)
    if given:
        return given
    stack: LocalStack = request.getfixturevalue("local_stack")
    return stack.start_kafka().bootstrap


@pytest.fixture(scope="session", name="prometheus")
def fixture_prometheus(request: pytest.FixtureRequest) -> PrometheusService:
    """A real Prometheus (1s scrape interval) that tests can add scrape targets to."""
    given = os.environ.get(ENV_PROMETHEUS_URL)
    if given:
        targets_dir = os.environ.get(ENV_PROMETHEUS_TARGETS_DIR)
        return PrometheusService(given.rstrip("/"), Path(targets_dir) if targets_dir else None)
    stack: LocalStack = request.getfixturevalue("local_stack")
    server = stack.start_prometheus()
    return PrometheusService(server.url, server.targets_dir)


@pytest.fixture(scope="session", name="alertmanager")
def fixture_alertmanager(
    request: pytest.FixtureRequest, stack_paths: StackPaths
) -> AlertmanagerService:
    """A real Alertmanager; the session's own is the one its Prometheus sends alerts to."""
    given = os.environ.get(ENV_ALERTMANAGER_URL)
    if given:
        config = os.environ.get(ENV_ALERTMANAGER_CONFIG)
        return AlertmanagerService(given.rstrip("/"), Path(config) if config else None, stack_paths)
    stack: LocalStack = request.getfixturevalue("local_stack")
    server = stack.start_alertmanager()
    return AlertmanagerService(server.url, server.config_path, stack_paths)


@pytest.fixture(scope="session", name="kafka_admin")
def fixture_kafka_admin(kafka_bootstrap: str) -> Iterator[Any]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=15000)
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture(name="kafka_consumer_settings")
def fixture_kafka_consumer_settings() -> dict[str, Any]:
    """KafkaConsumer keyword arguments for fast group joins and manual commits (a fresh copy)."""
    return dict(FAST_CONSUMER_SETTINGS)


@pytest.fixture(name="fresh_topic")
def fixture_fresh_topic(
    kafka_admin: Any, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """A factory: `fresh_topic(partitions=3)` creates a uniquely named topic, deleted afterwards."""
    created: list[str] = []

    def create(partitions: int = 3, configs: dict[str, str] | None = None) -> str:
        from kafka.admin import NewTopic  # the form kafka-python 2.x and 3.x both accept

        name = unique_name("test", request.node.name)
        kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1,
                      topic_configs=configs or {})]
        )  # fmt: skip
        created.append(name)
        wait_until(
            lambda: _leaders_elected(kafka_admin, name, partitions),
            30,
            message=f"leaders for the {partitions} partitions of {name}",
        )
        return name

    try:
        yield create
    finally:
        if created:
            kafka_admin.delete_topics(created)


def _leaders_elected(admin: Any, topic: str, partitions: int) -> bool:
    (description,) = admin.describe_topics([topic])
    # kafka-python 3.x names the field leader_id, 2.x leader.
    leaders = [p.get("leader_id", p.get("leader", -1)) for p in description["partitions"]]
    return len(leaders) == partitions and all(leader >= 0 for leader in leaders)


@pytest.fixture(name="consumer_group")
def fixture_consumer_group(kafka_admin: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A consumer group id used by this test only; its offsets are deleted afterwards."""
    group = unique_name("group", request.node.name)
    try:
        yield group
    finally:
        from kafka.errors import KafkaError

        # kafka-python 3.x calls it delete_groups, 2.x delete_consumer_groups.
        delete = getattr(kafka_admin, "delete_groups", None) or kafka_admin.delete_consumer_groups
        # A group that never committed has nothing to delete; the answer is only logged.
        with contextlib.suppress(KafkaError):
            logger.debug("deleted group %s: %s", group, delete([group]))
