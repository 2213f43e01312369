"""Dead letters: a rejected record goes, unchanged, to the dead-letter topic with why and where.

Usage:
    outbox.send(dead_letter("headwatch.head-stats.v1.dlq", tp, record, "decode", "bad magic"))
"""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition

from exporter.outbox import Letter

REASON_HEADER = "headwatch-reason"
SOURCE_HEADER = "headwatch-source"
DETAIL_HEADER = "headwatch-detail"


def dead_letter(topic: str, tp: TopicPartition, record: Any, reason: str, detail: str) -> Letter:
    """Return the letter for a rejected record: its key and value, with headers reason, source
    `topic[partition]@offset` and a bounded detail. A record with neither key nor value (which
    Kafka allows, and a producer refuses to send) goes with an empty value."""
    headers = [
        (REASON_HEADER, reason.encode()),
        (SOURCE_HEADER, f"{tp.topic}[{tp.partition}]@{record.offset}".encode()),
        (DETAIL_HEADER, detail[:500].encode("utf-8", "replace")),
    ]
    value = b"" if record.key is None and record.value is None else record.value
    return Letter(topic, record.key, value, headers, kind="dead_letter", source=tp)
