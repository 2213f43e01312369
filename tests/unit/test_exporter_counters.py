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
