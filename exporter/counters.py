"""The replica's own counters, and a warning log that stays quiet when one problem repeats.

Usage:
    counters = ReplicaCounters(); counters.of(tp).messages += 1
    counters.committed([tp]); counters.publish(assigned_partitions=3)
    warn = RateLimitedLog(logger, every_seconds=10.0); warn("commit", "commit failed: %r", exc)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from exporter.metrics import ExporterStats


@dataclass
class Counts:
    """Counts of messages and letters, for one partition or for the replica."""

    messages: int = 0
    duplicates: int = 0
    stale: int = 0
    dead_letters: int = 0
    abandoned: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)

    def add(self, other: Counts) -> None:
        """Add `other`'s counts to these."""
        self.messages += other.messages
        self.duplicates += other.duplicates
        self.stale += other.stale
        self.dead_letters += other.dead_letters
        self.abandoned.update(other.abandoned)
        self.invalid.update(other.invalid)


class ReplicaCounters:
    """Counts kept by the consumer loop; `visible` is the copy scrapes read (set at commits).

    Counts wait per partition until that partition's offsets commit: a partition lost before
    its commit takes its counts with it (its next owner counts those messages), so nothing is
    counted twice.
    """

    def __init__(self) -> None:
        self.totals = Counts()
        self.pending: dict[TopicPartition, Counts] = {}
        self.last_message_wall = 0.0
        self.rebuild_seconds = 0.0
        self.lag: dict[tuple[str, int], int] = {}
        self.visible = ExporterStats()

    def of(self, tp: TopicPartition) -> Counts:
        """Return the uncommitted counts of a partition."""
        counts = self.pending.get(tp)
        if counts is None:
            counts = self.pending[tp] = Counts()
        return counts

    def committed(self, partitions: Iterable[TopicPartition]) -> None:
        """Move the counts of partitions whose offsets just committed into the totals."""
        for tp in partitions:
            counts = self.pending.pop(tp, None)
            if counts is not None:
                self.totals.add(counts)

    def forget(self, tp: TopicPartition) -> None:
        """Drop the uncommitted counts of a partition this replica lost."""
        self.pending.pop(tp, None)

    def publish(self, assigned_partitions: int) -> None:
        """Make the committed counts visible to scrapes."""
        t = self.totals
        self.visible = ExporterStats(
            messages_total=t.messages,
            invalid=dict(t.invalid),
            duplicates=t.duplicates,
            stale=t.stale,
            dead_letters=t.dead_letters,
            abandoned=dict(t.abandoned),
            lag=dict(self.lag),
            assigned_partitions=assigned_partitions,
            last_message_wall=self.last_message_wall,
            rebuild_seconds=self.rebuild_seconds,
        )


class RateLimitedLog:
    """Logs a warning per key at most once every `every_seconds`."""

    def __init__(self, logger: logging.Logger, every_seconds: float) -> None:
        self._logger = logger
        self._every = every_seconds
        self._last: dict[str, float] = {}

    def __call__(self, key: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self._every:
            self._last[key] = now
            self._logger.warning(fmt, *args)
