"""Replica counters wait per partition for that partition's commit."""

from __future__ import annotations

from kafka import TopicPartition

from exporter.counters import ReplicaCounters

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


def test_counts_become_visible_only_for_partitions_that_committed() -> None:
    c = ReplicaCounters()
    c.of(A).messages += 3
    c.of(A).invalid["decode"] += 1
    c.of(B).messages += 5
    c.of(B).duplicates += 2
    c.committed([A])
    c.publish(assigned_partitions=2)
    assert (c.visible.messages_total, c.visible.invalid, c.visible.duplicates) == (
        3,
        {"decode": 1},
        0,
    )
    c.committed([B])
    c.publish(assigned_partitions=2)
    assert (c.visible.messages_total, c.visible.duplicates) == (8, 2)


def test_a_lost_partition_takes_its_uncommitted_counts_with_it() -> None:
    """Its next owner replays from the last commit and counts those messages: not twice here."""
    c = ReplicaCounters()
    c.of(A).messages += 4
    c.of(A).stale += 1
    c.of(B).messages += 1
    c.forget(A)
    c.committed([A, B])
    c.publish(assigned_partitions=1)
    assert (c.visible.messages_total, c.visible.stale) == (1, 0)
    c.of(A).messages += 2  # the partition came back and committed later
    c.committed([A])
    c.publish(assigned_partitions=2)
    assert c.visible.messages_total == 3


def test_letters_of_a_lost_partition_are_delivered_but_no_longer_counted() -> None:
    from exporter.outbox import Letter, Outbox

    class Refusing:  # a producer whose sends fail at once: the letters stay outstanding
        def send(self, *args: object, **kwargs: object) -> None:
            raise BufferError("buffer full")

        def flush(self, timeout: float) -> None:
            return None

    outbox = Outbox(Refusing(), max_attempts=3)  # type: ignore[arg-type]
    mine, lost = Letter("dlq", b"k", b"v", source=A), Letter("dlq", b"k", b"v", source=B)
    outbox.send(mine)
    outbox.send(lost)
    outbox.disown({B})
    assert (mine.counted, lost.counted) == (True, False) and len(outbox) == 2
