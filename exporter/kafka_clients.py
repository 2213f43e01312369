"""Kafka client construction and topic set-up, with library errors translated at the boundary.

Usage:
    producer = make_producer(settings.kafka)
    ensure_topics(settings.kafka)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    AuthorizationError,
    KafkaConfigurationError,
    KafkaError,
    TopicAlreadyExistsError,
)

from exporter.errors import BrokerUnavailableError
from exporter.settings import KafkaSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Errors retrying cannot fix: wrong credentials, missing rights, bad configuration.
FATAL_ERRORS: tuple[type[Exception], ...] = (
    AuthorizationError,
    KafkaConfigurationError,
)


def common_config(k: KafkaSettings) -> dict[str, Any]:
    """Return the connection keyword arguments every client shares."""
    config: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers.split(","),
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
        "request_timeout_ms": k.request_timeout_ms,
        "metadata_max_age_ms": k.metadata_max_age_ms,
    }
    # kafka-python 3 waits up to bootstrap_timeout_ms for a first broker; keep it within ours.
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:
        config["bootstrap_timeout_ms"] = int(min(k.startup_timeout_seconds, 30.0) * 1000)
    if k.sasl_mechanism:
        config["sasl_mechanism"] = k.sasl_mechanism
        config["sasl_plain_username"] = k.sasl_username
        config["sasl_plain_password"] = (
            k.sasl_password.get_secret_value() if k.sasl_password else None
        )
    return config


def with_startup_retries(k: KafkaSettings, what: str, make: Callable[[], T]) -> T:
    """Return make() once the broker answers; raise BrokerUnavailableError after the timeout."""
    deadline = time.monotonic() + k.startup_timeout_seconds
    delay = 0.2
    while True:
        try:
            return make()
        except FATAL_ERRORS as exc:
            raise BrokerUnavailableError(f"{what}: {exc!r}") from exc
        except (KafkaError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                raise BrokerUnavailableError(
                    f"{what}: no broker at {k.bootstrap_servers} within "
                    f"{k.startup_timeout_seconds}s ({exc!r})"
                ) from exc
            logger.info("%s: broker not reachable yet (%r); retrying", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def make_producer(k: KafkaSettings) -> KafkaProducer:
    """Return a producer for dead letters and references (acks=all, retried)."""
    return with_startup_retries(
        k,
        "producer",
        lambda: KafkaProducer(
            **common_config(k), acks="all", retries=5, linger_ms=5, max_request_size=4 << 20
        ),
    )


def make_group_consumer(k: KafkaSettings) -> KafkaConsumer:
    """Return the group consumer (manual commits; subscription done by the caller)."""
    return with_startup_retries(
        k,
        "consumer",
        lambda: KafkaConsumer(
            **common_config(k),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=k.max_poll_records,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            max_partition_fetch_bytes=k.max_partition_fetch_bytes,
            check_crcs=k.check_crcs,
        ),
    )


def make_reader(k: KafkaSettings) -> KafkaConsumer:
    """Return a group-less consumer for reading the reference topic by manual assignment."""
    return with_startup_retries(
        k,
        "reference reader",
        lambda: KafkaConsumer(
            **common_config(k), group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100
        ),
    )


def ensure_topics(k: KafkaSettings) -> None:
    """Create the dead-letter topic and the compacted reference topic if they do not exist."""
    admin = with_startup_retries(k, "admin", lambda: KafkaAdminClient(**common_config(k)))
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(k.dead_letter_topic, num_partitions=1, replication_factor=-1),
            NewTopic(
                k.reference_topic,
                num_partitions=k.reference_partitions,
                replication_factor=-1,
                topic_configs={"cleanup.policy": "compact"},
            ),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
                logger.info("created topics %s", [t.name for t in missing])
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:  # e.g. no CreateTopics right: operators create them
                logger.warning("could not create %s: %r", [t.name for t in missing], exc)
    finally:
        admin.close()
