"""Kafka adapter: the consumer-group loop that decodes, folds, dead-letters and commits.

Usage:
    service = ConsumerService(settings.kafka, settings.aggregate_policy())
    service.run(stop_event)  # until stop_event is set; raises BrokerUnavailableError if fatal

Offsets are committed only for messages already folded in (or dead-lettered), and only once every
record written so far (dead letters, drift references) is acknowledged by the broker
(exporter.outbox). Counts wait per partition for its commit: a partition lost before its commit
takes them with it, and its next owner counts those messages.
When partitions are assigned, state is rebuilt by seeking back `horizon_seconds` by timestamp
(offsets_for_times) and replaying up to the committed offset: replayed messages rebuild windows
but are not counted again, so counters continue where the previous owner's commits left them.
Redelivered messages are recognised by message id within the window and skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from collector.schema import SchemaError
from exporter.aggregate import Aggregator, Fold
from exporter.counters import RateLimitedLog, ReplicaCounters
from exporter.deadletter import dead_letter
from exporter.errors import BrokerUnavailableError
from exporter.kafka_clients import FATAL_ERRORS, ensure_topics, make_group_consumer, make_producer
from exporter.metrics import ExporterStats
from exporter.model_state import AggregatePolicy
from exporter.outbox import Outbox
from exporter.rebalance import RevocationRecorder, replay_starts
from exporter.refstore import ReferenceStore
from exporter.settings import KafkaSettings
from exporter.snapshot import ModelSnapshot

logger = logging.getLogger(__name__)

_LAG_EVERY_SECONDS = 5.0
_EXPIRE_EVERY_SECONDS = 10.0
_LOG_EVERY_SECONDS = 10.0


class ConsumerService:
    """Owns the consumer, the aggregator and the counters; `scrape_view` is safe from any thread."""

    def __init__(self, k: KafkaSettings, policy: AggregatePolicy, clock: Any = time.time) -> None:
        self._k = k
        self._clock = clock
        self.aggregator = Aggregator(policy)
        self._lock = threading.Lock()
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._outbox: Outbox | None = None
        self._store: ReferenceStore | None = None
        self._listener = RevocationRecorder()
        self._replay_until: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int | None] = {}
        # Offset after the last record folded (or rejected) per partition: never fold one twice.
        self._next: dict[TopicPartition, int] = {}
        self._rebuild_started: float | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._c = ReplicaCounters()
        self._touched: set[str] = set()
        self.loop_wall = 0.0
        self.alive = False
        self._log_limited = RateLimitedLog(logger, _LOG_EVERY_SECONDS)

    # --- views for the HTTP side -------------------------------------------------------------
    def scrape_view(self) -> tuple[list[ModelSnapshot], ExporterStats]:
        """Return the model snapshots and the counters as of the last successful commit."""
        with self._lock:
            return self.aggregator.snapshot(), self._c.visible

    def stats(self) -> ExporterStats:
        """Return the replica's counters as of the last commit (cheap: no model snapshots)."""
        with self._lock:
            return self._c.visible

    def health(self) -> dict[str, Any]:
        """Return liveness facts for /healthz."""
        with self._lock:
            return {
                "alive": self.alive,
                "loop_age_seconds": max(0.0, self._clock() - self.loop_wall)
                if self.loop_wall
                else None,
                "partitions": sorted(f"{tp.topic}[{tp.partition}]" for tp in self._replay_until),
                "assigned_partitions": len(self._replay_until),
                "lag_messages": sum(self._c.lag.values()),
                "rebuilding": self._rebuild_started is not None,
                "models": len(self.aggregator.models),
            }

    # --- rebalance ---------------------------------------------------------------------------
    def _reconcile(
        self, batches: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """Apply rebalances seen by the last poll; return the batches of partitions ready to fold.

        Lost partitions: their models are forgotten. New partitions (and ones that came back
        after another replica committed on them): seek back over the horizon and replay; their
        records in this batch are dropped, the seek fetches them again.
        """
        consumer = self._require_consumer()
        current = set(consumer.assignment())
        owned = set(self._replay_until)
        revoked = self._listener.revoked()
        bounced = revoked & current & owned
        moved = {tp for tp in bounced if consumer.committed(tp) != self._committed.get(tp)}
        lost = (owned - current) | moved
        if lost:
            with self._lock:
                dropped = self.aggregator.drop_partitions({tp.partition for tp in lost})
                for tp in lost:
                    self._replay_until.pop(tp, None)
                    self._committed.pop(tp, None)
                    self._next.pop(tp, None)
                    self._pending.pop(tp, None)
                    self._c.forget(tp)
                    self._c.lag.pop((tp.topic, tp.partition), None)
                if self._outbox is not None:
                    self._outbox.disown(lost)
            logger.info(
                "partitions %s gone; dropped %d models", sorted(map(str, lost)), len(dropped)
            )
        for tp in bounced - moved:
            # Kept through the rebalance: carry on after what was folded. The consumer resets
            # positions to the committed offset, which would fold uncommitted records twice.
            consumer.seek(tp, self._next[tp])
        new = current - set(self._replay_until)
        if new:
            self._assign(new)
        self._listener.forget(revoked)  # applied: a failure above leaves them for the next try
        return {
            tp: records
            for tp, records in batches.items()
            if tp in self._replay_until and tp not in new
        }

    def _assign(self, new: set[TopicPartition]) -> None:
        """Seek each new partition back over the window horizon and mark what is replay."""
        consumer = self._require_consumer()
        self._rebuild_started = self._clock()
        ordered = sorted(new)
        starts = replay_starts(
            consumer, ordered, self._clock() - self.aggregator.policy.horizon_seconds
        )
        with self._lock:
            self.aggregator.drop_partitions({tp.partition for tp in ordered})
        for tp, (start, committed) in starts.items():
            consumer.seek(tp, start)
            self._replay_until[tp] = committed if committed is not None else start
            self._committed[tp] = committed
            self._next[tp] = start
            logger.info(
                "assigned %s[%d]: replaying %d..%d (committed %s)",
                tp.topic, tp.partition, start, self._replay_until[tp], committed,
            )  # fmt: skip

    # --- main loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; raise BrokerUnavailableError on unrecoverable errors."""
        ensure_topics(self._k)
        self._producer = make_producer(self._k)
        self._outbox = Outbox(self._producer)
        self._store = ReferenceStore(self._k, self._producer)
        records = self._store.read_all()
        with self._lock:
            for record in records:
                self.aggregator.load(record)
        logger.info("loaded %d reference records from %s", len(records), self._k.reference_topic)
        self._consumer = make_group_consumer(self._k)
        self._consumer.subscribe([self._k.topic], listener=self._listener)
        self.alive = True
        next_lag = next_expire = 0.0
        try:
            while not stop.is_set():
                self.loop_wall = self._clock()
                try:
                    batches = self._consumer.poll(timeout_ms=self._k.poll_timeout_ms)
                except FATAL_ERRORS as exc:
                    raise BrokerUnavailableError(f"consumer: {exc!r}") from exc
                except KafkaError as exc:
                    self._log_limited("poll", "poll failed (will retry): %r", exc)
                    stop.wait(0.5)
                    continue
                try:
                    ready = self._reconcile(batches or {})
                except FATAL_ERRORS as exc:
                    raise BrokerUnavailableError(f"consumer: {exc!r}") from exc
                except KafkaError as exc:
                    self._log_limited("rebalance", "rebalance not applied yet: %r", exc)
                    self._rewind(batches or {})
                    stop.wait(0.5)
                    continue
                if ready:
                    self._fold_batches(ready)
                self._commit()
                self._check_rebuilt()
                self._sync_references()
                now = self._clock()
                if now >= next_lag:
                    self._update_lag()
                    next_lag = now + _LAG_EVERY_SECONDS
                # Not while rebuilding: replayed messages count for the TTL from their timestamps,
                # so a model half replayed would expire and lose the replayed part.
                if now >= next_expire and self._rebuild_started is None:
                    with self._lock:
                        for key in self.aggregator.expire(now):
                            logger.info("model %s expired after the TTL", key)
                    next_expire = now + _EXPIRE_EVERY_SECONDS
        finally:
            self.alive = False
            self.close()

    def _rewind(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Seek partitions still owned back to their next unfolded offset: the poll moved past
        records that were not folded, and the next poll must fetch them again."""
        consumer = self._require_consumer()
        assigned = consumer.assignment()
        for tp in batches:
            if tp in self._next and tp in assigned:
                consumer.seek(tp, self._next[tp])

    def _fold_batches(self, batches: dict[TopicPartition, list[Any]]) -> None:
        now = self._clock()
        with self._lock:
            for tp, records in batches.items():
                replay_until = self._replay_until.get(tp)
                if replay_until is None:
                    continue  # revoked while the batch was in flight
                records = [r for r in records if r.offset >= self._next[tp]]
                if not records:
                    continue
                self._next[tp] = records[-1].offset + 1
                replay = [r.offset < replay_until for r in records]
                try:
                    outcomes = self.aggregator.fold_records(
                        [r.value for r in records],
                        partition=tp.partition,
                        replay=replay,
                        now_wall=now,
                    )
                except Exception:  # a bug must not stop the pipeline: fall back to one by one
                    logger.exception(
                        "batch fold failed at %s[%d]; folding one by one", tp.topic, tp.partition
                    )
                    outcomes = [
                        self._fold_alone(tp, r, rp, now)
                        for r, rp in zip(records, replay, strict=True)
                    ]
                for record, is_replay, (outcome, key) in zip(
                    records, replay, outcomes, strict=True
                ):
                    self._account(tp, record, is_replay, outcome, key, now)
            for ref in self.aggregator.take_new_references():
                if self._store is not None and self._outbox is not None:
                    self._outbox.send(self._store.letter(ref))
                logger.info("new drift reference for %s (%d rows)", ref.model_key, ref.samples)

    def _fold_alone(
        self, tp: TopicPartition, record: Any, replay: bool, now: float
    ) -> tuple[Fold | SchemaError, str | None]:
        try:
            return self.aggregator.fold_bytes(
                record.value, partition=tp.partition, replay=replay, now_wall=now
            )
        except SchemaError as exc:
            return exc, None
        except Exception as exc:
            logger.exception(
                "unexpected error folding %s[%d]@%d", tp.topic, tp.partition, record.offset
            )
            return SchemaError("validation", f"internal error: {type(exc).__name__}"), None

    def _account(
        self,
        tp: TopicPartition,
        record: Any,
        replay: bool,
        outcome: Fold | SchemaError,
        key: str | None,
        now: float,
    ) -> None:
        if not replay:
            self._c.of(tp).messages += 1
            self._c.last_message_wall = now
            self._pending[tp] = record.offset + 1
        if isinstance(outcome, SchemaError):
            self._poison(tp, record, outcome.reason, outcome.detail, replay)
            return
        if outcome is Fold.DUPLICATE and not replay:
            self._c.of(tp).duplicates += 1
        if outcome is Fold.STALE and not replay:
            self._c.of(tp).stale += 1
            self._log_limited(
                "stale", "message at %s[%d]@%d is older than the horizon behind %s's newest; skipped",
                tp.topic, tp.partition, record.offset, key,
            )  # fmt: skip
        if key is not None:
            self._touched.add(key)

    def _poison(
        self, tp: TopicPartition, record: Any, reason: str, detail: str, replay: bool
    ) -> None:
        if replay:
            return  # the previous owner counted and dead-lettered it
        self._c.of(tp).invalid[reason] += 1
        self._log_limited(
            f"invalid:{reason}", "invalid message at %s[%d]@%d (%s): %s",
            tp.topic, tp.partition, record.offset, reason, detail[:200],
        )  # fmt: skip
        if self._outbox is not None:
            self._outbox.send(dead_letter(self._k.dead_letter_topic, tp, record, reason, detail))

    def _commit(self) -> None:
        if self._consumer is None or not self._settle_outbox() or not self._pending:
            return
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in self._pending.items()}
        try:
            self._consumer.commit(offsets=offsets, timeout_ms=10_000)
        except CommitFailedError as exc:
            self._log_limited("commit", "commit refused (rebalance?): %r", exc)
            return
        except KafkaError as exc:
            self._log_limited("commit", "commit failed (will retry): %r", exc)
            return
        self._committed.update(self._pending)
        with self._lock:
            self._c.committed(self._pending)
            self._pending.clear()
            self.aggregator.publish_counters(self._touched)
            self._touched.clear()
            self._c.publish(len(self._replay_until))

    def _settle_outbox(self) -> bool:
        """Wait for the records written so far; return whether none is outstanding (then the
        offsets that produced them may be committed)."""
        if self._outbox is None or not len(self._outbox):
            return True
        settled = self._outbox.settle(timeout_seconds=30)
        for letter in settled.acknowledged:
            if letter.kind == "dead_letter" and letter.counted and letter.source is not None:
                self._c.of(letter.source).dead_letters += 1
        for letter in settled.abandoned:
            if letter.source is None:  # a reference: the replica's own write
                self._c.totals.abandoned[letter.kind] += 1
            elif letter.counted:
                self._c.of(letter.source).abandoned[letter.kind] += 1
        if not settled.done:
            self._log_limited(
                "outbox", "%d records not acknowledged yet; not committing", len(self._outbox)
            )
        return settled.done

    def _check_rebuilt(self) -> None:
        if self._rebuild_started is None or self._consumer is None:
            return
        try:
            done = all(self._consumer.position(tp) >= end for tp, end in self._replay_until.items())
        except KafkaError:
            return
        if done:
            with self._lock:
                self._c.rebuild_seconds = self._clock() - self._rebuild_started
                self._rebuild_started = None
                self._c.publish(len(self._replay_until))
            logger.info("windows rebuilt in %.2fs", self._c.rebuild_seconds)

    def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        tps = list(self._replay_until)
        try:
            ends = consumer.end_offsets(tps, timeout_ms=2000) if tps else {}
            lag = {(tp.topic, tp.partition): max(0, ends[tp] - consumer.position(tp)) for tp in tps}
        except KafkaError as exc:
            self._log_limited("lag", "lag not updated: %r", exc)
            return
        with self._lock:
            self._c.lag = lag
            self._c.visible = dataclasses.replace(
                self._c.visible, lag=dict(lag), assigned_partitions=len(tps)
            )

    def _sync_references(self) -> None:
        if self._store is None:
            return
        try:
            records = self._store.poll()
        except KafkaError as exc:
            self._log_limited("refs", "reference topic not read: %r", exc)
            return
        if records:
            with self._lock:
                for record in records:
                    self.aggregator.load(record)

    def _require_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("expected a running consumer, got none")
        return self._consumer

    def close(self) -> None:
        """Close the Kafka clients (the group leaves, so partitions move at once)."""
        for client in (self._consumer, self._producer, self._store):
            if client is not None:
                try:
                    client.close()
                except Exception as exc:  # closing must not mask the reason we are closing
                    logger.warning("error closing %s: %r", type(client).__name__, exc)
        self._consumer = self._producer = self._store = None
