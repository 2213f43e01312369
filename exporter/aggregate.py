"""Fold decoded messages into per-model state; the pure core the Kafka and Prometheus adapters share.

Usage:
    agg = Aggregator(AggregatePolicy())
    agg.fold(HeadStatsMessage.from_bytes(value), partition=0, replay=False, now_wall=time.time())
    snapshots = agg.snapshot()

Not thread-safe: the consumer loop holds a lock around fold and snapshot.
"""

from __future__ import annotations

import enum
import logging

from collector.schema import HeadStatsMessage, SchemaError
from exporter.model_state import AggregatePolicy, ModelState, identity
from exporter.reference import RebaselineRequest, Reference
from exporter.samples import to_sample, to_samples
from exporter.snapshot import ModelSnapshot
from exporter.window import Sample

logger = logging.getLogger(__name__)


class Fold(enum.Enum):
    """What happened to a message handed to `Aggregator.fold`."""

    FOLDED = "folded"
    DUPLICATE = "duplicate"
    STALE = "stale"


class Aggregator:
    """Per-model windows, references and verdicts of the partitions this replica owns."""

    def __init__(self, policy: AggregatePolicy) -> None:
        self.policy = policy
        self.models: dict[str, ModelState] = {}
        self.references: dict[str, Reference] = {}
        self.requests: dict[str, RebaselineRequest] = {}
        self.new_references: list[Reference] = []

    def fold_bytes(
        self, value: bytes | None, *, partition: int, replay: bool, now_wall: float
    ) -> tuple[Fold, str]:
        """Decode, validate and fold a record value; return the outcome and the model identity.

        Raises SchemaError (with a `reason` of the closed set) for anything that is not a valid
        message this replica can fold; nothing else escapes for bad input.
        """
        if value is None:
            raise SchemaError("decode", "empty record (tombstone)")
        msg = HeadStatsMessage.from_bytes(value)
        outcome = self.fold(msg, partition=partition, replay=replay, now_wall=now_wall)
        return outcome, identity(msg.header)

    def fold_records(
        self, values: list[bytes | None], *, partition: int, replay: list[bool], now_wall: float
    ) -> list[tuple[Fold | SchemaError, str | None]]:
        """Fold a batch of record values in order; return (outcome or rejection, identity) each.

        Same result as folding one by one, except that the per-head maths runs once per model
        for the whole batch (the throughput path). A duplicate is recognised against the window
        as it stood before the batch and against the batch itself.
        """
        outcomes: list[tuple[Fold | SchemaError, str | None]] = [(Fold.STALE, None)] * len(values)
        groups: dict[str, list[tuple[int, HeadStatsMessage]]] = {}
        for i, value in enumerate(values):
            try:
                if value is None:
                    raise SchemaError("decode", "empty record (tombstone)")
                msg = HeadStatsMessage.from_bytes(value)
                self._admit(msg, now_wall)
            except SchemaError as exc:
                outcomes[i] = (exc, None)
                continue
            groups.setdefault(identity(msg.header), []).append((i, msg))
        for key, items in groups.items():
            state = self._state(items[0][1], partition, now_wall)
            state.partitions.add(partition)
            accepted: list[tuple[int, HeadStatsMessage]] = []
            seen: set[str] = set()
            newest = state.window.newest_seconds
            for i, msg in items:
                header = msg.header
                if not state.matches_layout(header):
                    outcomes[i] = (SchemaError("shape", f"layout of {key} changed"), key)
                elif header.message_id in state.window or header.message_id in seen:
                    outcomes[i] = (Fold.DUPLICATE, key)
                elif header.timestamp_seconds < newest - self.policy.horizon_seconds:
                    outcomes[i] = (Fold.STALE, key)
                else:
                    newest = max(newest, header.timestamp_seconds)
                    seen.add(header.message_id)
                    accepted.append((i, msg))
            for (i, msg), sample in self._samples(key, accepted, outcomes):
                completed = state.fold(msg, sample, replay=replay[i], now_wall=now_wall)
                outcomes[i] = (Fold.FOLDED, key)
                if completed is not None:
                    self.references[key] = completed
                    self.new_references.append(completed)
        return outcomes

    def _samples(
        self,
        key: str,
        accepted: list[tuple[int, HeadStatsMessage]],
        outcomes: list[tuple[Fold | SchemaError, str | None]],
    ) -> list[tuple[tuple[int, HeadStatsMessage], Sample]]:
        """Return the samples of a model's accepted messages, computed for the whole group; if
        that fails (a bug a message triggers), one by one, rejecting only the messages that fail.
        Nothing is folded before every sample of the group exists, so no message folds twice."""
        try:
            samples = to_samples([m for _, m in accepted], self.policy.patterns)
            return list(zip(accepted, samples, strict=True))
        except Exception:
            logger.exception("samples of %s failed as a batch; computing them one by one", key)
        out = []
        for item in accepted:
            try:
                out.append((item, to_sample(item[1], self.policy.patterns)))
            except Exception as exc:
                outcomes[item[0]] = (SchemaError("validation", f"internal error: {exc!r}"), key)
        return out

    def _admit(self, msg: HeadStatsMessage, now_wall: float) -> None:
        header = msg.header
        cells = header.num_layers * header.num_query_heads
        if cells > self.policy.max_heads_per_model:
            raise SchemaError(
                "oversized",
                f"{cells} heads > max_heads_per_model {self.policy.max_heads_per_model}",
            )
        ahead = header.timestamp_seconds - now_wall
        if ahead > self.policy.max_future_seconds:
            raise SchemaError(
                "out_of_range",
                f"timestamp {header.timestamp_seconds:.0f} is {ahead:.0f} s ahead of this "
                f"replica's clock (max_future_seconds {self.policy.max_future_seconds:g})",
            )

    def _state(self, msg: HeadStatsMessage, partition: int, now_wall: float) -> ModelState:
        key = identity(msg.header)
        state = self.models.get(key)
        if state is None:
            state = ModelState(
                msg.header,
                self.policy,
                partition,
                self._valid_reference(key),
                now_wall,
                reference_after_seconds=self._requested_seconds(key),
            )
            self.models[key] = state
        return state

    def fold(self, msg: HeadStatsMessage, *, partition: int, replay: bool, now_wall: float) -> Fold:
        """Fold a valid message; raise SchemaError (reason shape/oversized) if it cannot be."""
        header = msg.header
        self._admit(msg, now_wall)
        key = identity(header)
        fresh = key not in self.models
        state = self._state(msg, partition, now_wall)
        if not fresh and not state.matches_layout(header):
            raise SchemaError("shape", f"layout of {key} changed without a new config_hash")
        state.partitions.add(partition)
        if header.message_id in state.window:
            return Fold.DUPLICATE
        if header.timestamp_seconds < state.window.newest_seconds - self.policy.horizon_seconds:
            return Fold.STALE
        completed = state.fold(
            msg, to_sample(msg, self.policy.patterns), replay=replay, now_wall=now_wall
        )
        if completed is not None:
            self.references[key] = completed
            self.new_references.append(completed)
        return Fold.FOLDED

    def publish_counters(self, keys: set[str] | None = None) -> None:
        """Expose the counters of `keys` (all models if None) to scrapes: call after a commit."""
        for key, state in self.models.items():
            if keys is None or key in keys:
                state.publish_counters()

    def take_new_references(self) -> list[Reference]:
        """Return and forget the references completed since the last call (to persist them)."""
        out, self.new_references = self.new_references, []
        return out

    def _requested_seconds(self, key: str) -> float:
        times = [r.requested_seconds for r in self.requests.values() if r.matches(key)]
        return max(times, default=0.0)

    def _valid_reference(self, key: str) -> Reference | None:
        ref = self.references.get(key)
        if ref is None or ref.created_seconds < self._requested_seconds(key):
            return None
        return ref

    def load(self, record: Reference | RebaselineRequest) -> None:
        """Apply a record of the reference topic (at start-up or while running)."""
        if isinstance(record, Reference):
            if record.created_seconds >= self._requested_seconds(record.model_key):
                self.references[record.model_key] = record
                state = self.models.get(record.model_key)
                if state is not None and state.reference is None and record.shape == state.shape:
                    state.reference = record
            return
        self.requests[record.model_key] = record
        for key, state in self.models.items():
            if record.matches(key):
                ref = state.reference
                if ref is None or ref.created_seconds < record.requested_seconds:
                    self.references.pop(key, None)
                    state.restart_reference(record.requested_seconds)

    def drop_partitions(self, partitions: set[int]) -> list[str]:
        """Forget the models fed by any of `partitions` (revoked from this replica)."""
        dropped = [k for k, s in self.models.items() if s.partitions & partitions]
        for key in dropped:
            del self.models[key]
        return dropped

    def expire(self, now_wall: float) -> list[str]:
        """Forget models that sent nothing for model_ttl_seconds; return their keys."""
        cutoff = now_wall - self.policy.model_ttl_seconds
        expired = [k for k, s in self.models.items() if s.last_fold_wall < cutoff]
        for key in expired:
            del self.models[key]
        return expired

    def snapshot(self) -> list[ModelSnapshot]:
        """Return one snapshot per model, sorted by model name then identity.

        When one model name has several identities (a new config_hash after a redeploy), only the
        one with the newest message is exported, so the series keep one `model_name` each; the
        older identity expires with the TTL.
        """
        newest: dict[str, ModelState] = {}
        for state in self.models.values():
            have = newest.get(state.model_name)
            if have is None or (state.last_message_seconds, state.model_key) > (
                have.last_message_seconds,
                have.model_key,
            ):
                newest[state.model_name] = state
        return [newest[name].snapshot() for name in sorted(newest)]
