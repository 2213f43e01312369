"""Outbox retries: the broker away is waited out, a record refused for good is given up.

A producer that fails every send at once stands in for the client here; the real broker's
refusal (a record above max.message.bytes) is in tests/integration/test_exporter_outbox.py.
"""

from __future__ import annotations

from kafka.errors import KafkaTimeoutError

from exporter.outbox import Letter, Outbox


class Failing:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sends = 0

    def send(self, *args: object, **kwargs: object) -> None:
        self.sends += 1
        raise self.error

    def flush(self, timeout: float) -> None:
        return None


def test_a_retriable_failure_is_retried_for_as_long_as_it_lasts() -> None:
    """The broker away (a timeout) holds commits back; it never abandons a dead letter."""
    producer = Failing(KafkaTimeoutError("metadata not available"))
    outbox = Outbox(producer, max_attempts=3)  # type: ignore[arg-type]
    outbox.send(Letter("dlq", b"k", b"v"))
    for _ in range(10):
        settled = outbox.settle(timeout_seconds=0)
        assert not settled.done and not settled.abandoned
    assert producer.sends == 11 and len(outbox) == 1


def test_a_record_refused_for_good_is_abandoned_after_max_attempts() -> None:
    producer = Failing(ValueError("Need at least one: key or value"))
    outbox = Outbox(producer, max_attempts=3)  # type: ignore[arg-type]
    letter = Letter("dlq", None, None)
    outbox.send(letter)
    results = [outbox.settle(timeout_seconds=0) for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert results[-1].abandoned == [letter] and letter.attempts == 3 and len(outbox) == 0
