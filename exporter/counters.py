"""The replica's own counters, and a warning log that stays quiet when one problem repeats.

Usage:
    counters = ReplicaCounters(); counters.messages += 1; counters.publish(assigned=3)
    warn = RateLimitedLog(logger, every_seconds=10.0); warn("commit", "commit failed: %r", exc)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from exporter.metrics import ExporterStats


class ReplicaCounters:
    """Counts kept by the consumer loop; `visible` is the copy scrapes read (set at commits)."""

    def __init__(self) -> None:
        self.messages = 0
        self.duplicates = 0
        self.dead_letters = 0
        self.dead_letters_pending = 0
        self.invalid: Counter[str] = Counter()
        self.last_message_wall = 0.0
        self.rebuild_seconds = 0.0
        self.lag: dict[tuple[str, int], int] = {}
        self.visible = ExporterStats()

    def publish(self, assigned_partitions: int) -> None:
        """Make the counts so far visible to scrapes (after their offsets are committed)."""
        self.visible = ExporterStats(
            messages_total=self.messages,
            invalid=dict(self.invalid),
            duplicates=self.duplicates,
            dead_letters=self.dead_letters,
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
