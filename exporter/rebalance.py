"""Rebalance helpers of the Kafka adapter: a listener that only records, and where to resume.

Usage:
    listener = RevocationRecorder(); consumer.subscribe([topic], listener=listener)
    starts = replay_starts(consumer, new_partitions, horizon_start_seconds)
"""

from __future__ import annotations

import threading
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition


class RevocationRecorder(ConsumerRebalanceListener):
    """Records rebalance events; kafka-python 3 runs listeners on its IO thread, where blocking
    calls (commit, offsets_for_times) are not allowed, so the work happens in the poll loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: Any) -> None:
        with self._lock:
            self._revoked |= set(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        return None

    def revoked(self) -> set[TopicPartition]:
        """Return the partitions revoked and not yet forgotten."""
        with self._lock:
            return set(self._revoked)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Forget revocations once applied (ones recorded meanwhile stay)."""
        with self._lock:
            self._revoked -= partitions


def replay_starts(
    consumer: KafkaConsumer, partitions: list[TopicPartition], since_seconds: float
) -> dict[TopicPartition, tuple[int, int | None]]:
    """Return, per partition, (offset to replay from, committed offset or None).

    The replay starts at the first record at or after `since_seconds` (offsets_for_times), or
    earlier if the group's committed offset is older (nothing between is lost), or at the end when
    nothing is that recent. Only blocking calls: nothing changes if the broker fails here.
    """
    by_time = consumer.offsets_for_times(
        {tp: max(int(since_seconds * 1000), 0) for tp in partitions}
    )
    ends = consumer.end_offsets(partitions)
    out: dict[TopicPartition, tuple[int, int | None]] = {}
    for tp in partitions:
        committed = consumer.committed(tp)
        found = by_time.get(tp)
        start = found.offset if found is not None else ends[tp]
        if committed is not None:
            start = min(start, committed)
        out[tp] = (start, committed)
    return out
