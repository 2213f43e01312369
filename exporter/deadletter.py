"""Dead letters: a rejected record goes, unchanged, to the dead-letter topic with why and where.

Usage:
    send_dead_letter(producer, "headwatch.head-stats.v1.dlq", tp, record, "decode", "bad magic")
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaProducer, TopicPartition

REASON_HEADER = "headwatch-reason"
SOURCE_HEADER = "headwatch-source"
DETAIL_HEADER = "headwatch-detail"


def send_dead_letter(
    producer: KafkaProducer, topic: str, tp: TopicPartition, record: Any, reason: str, detail: str
) -> None:
    """Queue the record's key and value with headers reason, source `topic[partition]@offset`
    and a bounded detail; the caller flushes before committing past it."""
    headers = [
        (REASON_HEADER, reason.encode()),
        (SOURCE_HEADER, f"{tp.topic}[{tp.partition}]@{record.offset}".encode()),
        (DETAIL_HEADER, detail[:500].encode("utf-8", "replace")),
    ]
    producer.send(topic, value=record.value, key=record.key, headers=headers)
