"""Drift references kept durably in a compacted Kafka topic, keyed by model identity.

Usage:
    store = ReferenceStore(settings.kafka, producer)
    for record in store.read_all(): aggregator.load(record)
    outbox.send(store.letter(reference))  # acknowledged before the consumer commits
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from exporter.errors import ModelNotFoundError, ReferenceRecordError
from exporter.kafka_clients import make_reader
from exporter.outbox import Letter
from exporter.reference import RebaselineRequest, Reference, decode_record
from exporter.settings import KafkaSettings

logger = logging.getLogger(__name__)


class ReferenceStore:
    """Reads every record of the reference topic and writes new references and requests."""

    def __init__(self, k: KafkaSettings, producer: KafkaProducer) -> None:
        self._k = k
        self._producer = producer
        self._reader: KafkaConsumer | None = None

    def _assign(self) -> KafkaConsumer:
        if self._reader is None:
            reader = make_reader(self._k)
            partitions = reader.partitions_for_topic(self._k.reference_topic) or set()
            tps = [TopicPartition(self._k.reference_topic, p) for p in sorted(partitions)]
            reader.assign(tps)
            reader.seek_to_beginning(*tps)
            self._reader = reader
        return self._reader

    def read_all(self, timeout_seconds: float = 30.0) -> list[Reference | RebaselineRequest]:
        """Return every decodable record up to the current end of the topic, oldest first."""
        reader = self._assign()
        tps = list(reader.assignment())
        if not tps:
            return []
        end = reader.end_offsets(tps)
        records: list[Reference | RebaselineRequest] = []
        deadline = time.monotonic() + timeout_seconds
        while any(reader.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                logger.warning("reference topic not read to its end within %ss", timeout_seconds)
                break
            records.extend(self._decode(reader.poll(timeout_ms=200)))
        return records

    def poll(self) -> list[Reference | RebaselineRequest]:
        """Return records written since the last read (non-blocking)."""
        return self._decode(self._assign().poll(timeout_ms=0))

    def _decode(self, batches: dict[Any, Any]) -> list[Reference | RebaselineRequest]:
        out: list[Reference | RebaselineRequest] = []
        for tp, records in batches.items():
            for record in records:
                if record.value is None:
                    continue
                try:
                    out.append(decode_record(record.value))
                except ReferenceRecordError as exc:
                    logger.warning(
                        "skipping reference record at %s[%d]@%d: %s",
                        tp.topic,
                        tp.partition,
                        record.offset,
                        exc,
                    )
        return out

    def letter(self, reference: Reference) -> Letter:
        """Return the record that stores a reference, for the consumer's outbox."""
        return Letter(
            self._k.reference_topic, reference.model_key.encode(), reference.to_bytes(),
            kind="reference",
        )  # fmt: skip

    def request_rebaseline(self, model_name: str, config_hash: str | None, now: float) -> str:
        """Write a re-baseline request for one identity or every identity of a model name."""
        key = f"{model_name}@{config_hash}" if config_hash else f"{model_name}@*"
        if config_hash is None:
            known = {
                r.model_key
                for r in self.read_all()
                if isinstance(r, Reference) and r.model_name == model_name
            }
            if not known:
                raise ModelNotFoundError(
                    f"expected a model with a reference in {self._k.reference_topic}, "
                    f"got none named {model_name!r}"
                )
        future = self._producer.send(
            self._k.reference_topic, key=key.encode(), value=RebaselineRequest(key, now).to_bytes()
        )
        future.get(timeout=30)  # raises the broker's refusal: a request must not vanish silently
        return key

    def close(self) -> None:
        """Close the reader."""
        if self._reader is not None:
            self._reader.close()
