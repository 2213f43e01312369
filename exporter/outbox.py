"""Records the exporter writes (dead letters, drift references) that must be acknowledged by the
broker before the consumer commits past the messages that produced them.

Usage:
    outbox = Outbox(producer)
    outbox.send(Letter(topic, key, value, headers, kind="dead_letter", source=tp))
    settled = outbox.settle(timeout_seconds=30)
    if settled.done: consumer.commit(...)  # every letter so far is acknowledged or abandoned

kafka-python's `send` returns a future and its `flush` returns once requests complete, failed or
not; only the futures tell which. A letter whose send failed is sent again at the next `settle`.
Retriable failures (the broker away, a timeout) are retried until they succeed, holding commits
back as the outage does anyway. A letter refused for good (a non-retriable error: a record too
large, no authorisation) is abandoned after `max_attempts` sends: counted, logged, and no longer
holding commits back, so that one unwritable record cannot stop the group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer, TopicPartition

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Letter:
    """One record to write; `source` is the consumed partition it accounts to, if any."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    kind: str = "dead_letter"
    source: TopicPartition | None = None
    counted: bool = True  # False once `source` moved to another replica (it counts the record)
    attempts: int = 0
    future: Any = None
    error: BaseException | None = None


@dataclass
class Settled:
    """What one `settle` found: letters acknowledged, letters abandoned, and whether all are."""

    done: bool
    acknowledged: list[Letter]
    abandoned: list[Letter]


class Outbox:
    """Letters sent and not yet acknowledged, with their futures; not thread-safe."""

    def __init__(self, producer: KafkaProducer, max_attempts: int = 5) -> None:
        if max_attempts < 1:
            raise ValueError(f"expected max_attempts >= 1, got {max_attempts}")
        self._producer = producer
        self._max_attempts = max_attempts
        self._letters: list[Letter] = []

    def __len__(self) -> int:
        return len(self._letters)

    def send(self, letter: Letter) -> None:
        """Queue a letter to the producer; never raises (a failed send is retried at settle)."""
        self._send(letter)
        self._letters.append(letter)

    def _send(self, letter: Letter) -> None:
        letter.attempts += 1
        letter.error = None
        try:
            letter.future = self._producer.send(
                letter.topic, value=letter.value, key=letter.key, headers=letter.headers
            )
        except Exception as exc:  # buffer full, metadata timeout, a record the client refuses
            letter.future, letter.error = None, exc

    def disown(self, partitions: set[TopicPartition]) -> None:
        """Stop accounting letters to partitions this replica lost (their next owner counts the
        records again); the letters are still delivered."""
        for letter in self._letters:
            if letter.source in partitions:
                letter.counted = False

    def settle(self, timeout_seconds: float) -> Settled:
        """Flush, then sort the letters: acknowledged, sent again, or abandoned after the last try."""
        if not self._letters:
            return Settled(True, [], [])
        try:
            self._producer.flush(timeout=timeout_seconds)
        except Exception as exc:  # a timeout: the unfinished futures stay for the next settle
            logger.warning("producer flush did not finish: %r", exc)
        acknowledged: list[Letter] = []
        abandoned: list[Letter] = []
        waiting: list[Letter] = []
        for letter in self._letters:
            future = letter.future
            if future is not None and not future.is_done:
                waiting.append(letter)
                continue
            if future is not None and future.succeeded():
                acknowledged.append(letter)
                continue
            if future is not None:
                letter.error = future.exception
            if letter.attempts >= self._max_attempts and not _retriable(letter.error):
                logger.error(
                    "abandoned a %s to %s after %d attempts: %r",
                    letter.kind, letter.topic, letter.attempts, letter.error,
                )  # fmt: skip
                abandoned.append(letter)
                continue
            self._send(letter)
            waiting.append(letter)
        self._letters = waiting
        return Settled(not waiting, acknowledged, abandoned)


def _retriable(error: BaseException | None) -> bool:
    """Whether kafka-python marks an error as one that may succeed on a later try."""
    return bool(getattr(error, "retriable", False))
