"""The state of one model identity: its window, drift test, reference and verdicts.

Usage:
    state = ModelState(msg.header, policy, partition=0, reference=None, now_wall=time.time())
    state.fold(msg, to_sample(msg, policy.patterns), replay=False, now_wall=time.time())

(to_sample lives in exporter.samples.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collector.schema import HeadStatsMessage, MessageHeader
from exporter.drift import DriftPolicy, DriftState, drift_step
from exporter.patterns import PatternThresholds, dominant
from exporter.reference import Reference
from exporter.snapshot import CONTEXT_BUCKETS, ModelSnapshot
from exporter.verdicts import (
    VerdictPolicy,
    eviction_quantiles,
    kv_head_any,
    kv_head_safe,
    measured_unsafe,
    reclaimable_bytes,
    update_safe,
)
from exporter.window import ENTROPY_COLUMNS, PATTERN_COLUMNS, CountWindow, Sample, new_counts


@dataclass(frozen=True)
class AggregatePolicy:
    """How messages are aggregated; built from ExporterSettings at the composition root."""

    window_samples: int = 512
    horizon_seconds: float = 3600.0
    model_ttl_seconds: float = 900.0
    max_heads_per_model: int = 16384
    evaluate_every_samples: int = 64
    max_future_seconds: float = 300.0
    patterns: PatternThresholds = field(default_factory=PatternThresholds)
    verdicts: VerdictPolicy = field(default_factory=VerdictPolicy)
    drift: DriftPolicy = field(default_factory=DriftPolicy)


def identity(header: MessageHeader) -> str:
    """Return the key a message aggregates under: its model identity (`name@config_hash`) and the
    keep-set (S sink, R recent tokens) it was measured with. Eviction errors, sink and recent masses,
    hence verdicts, patterns and drift references, hold for one keep-set only: a collector
    reconfigured with another R starts a new window rather than pooling the two."""
    return f"{header.model_key}/s{header.sink_tokens}r{header.recent_tokens}"


def _layout(header: MessageHeader) -> tuple[int, int, int, int, int]:
    return (
        header.num_layers,
        header.num_query_heads,
        header.num_kv_heads,
        header.head_dim,
        header.kv_dtype_bytes,
    )


class ModelState:
    """Everything the exporter knows about one model identity and keep-set (see `identity`)."""

    def __init__(
        self,
        header: MessageHeader,
        policy: AggregatePolicy,
        partition: int,
        reference: Reference | None,
        now_wall: float,
        reference_after_seconds: float = 0.0,
    ) -> None:
        self.policy = policy
        self.model_key = identity(header)
        self.model_name = header.model_name
        self.layout = _layout(header)
        layers, heads = header.num_layers, header.num_query_heads
        self.shape = (layers, heads)
        self.partitions = {partition}
        self.sink_tokens = header.sink_tokens
        self.recent_tokens = header.recent_tokens
        self.window = CountWindow(self.shape, policy.window_samples, policy.horizon_seconds)
        self.messages_total = 0
        self.context_counts = np.zeros(len(CONTEXT_BUCKETS) + 1, dtype=np.int64)
        self.context_sum = 0
        # Counters as of the last offset commit: what a scrape shows (see publish_counters).
        self.visible_counters: tuple[int, np.ndarray, float] = (0, self.context_counts.copy(), 0.0)
        self.last_message_seconds = 0.0
        self.last_fold_wall = now_wall
        self.folded = 0
        self.safe = np.zeros(self.shape, dtype=bool)
        # Heads unsafe on evidence, as of the last verdict (see evaluate_verdicts).
        self.unsafe = np.zeros(self.shape, dtype=bool)
        self.drift = DriftState.empty(self.shape)
        self._test = new_counts(self.shape)
        self._test_rows = 0
        self.reference = (
            reference if reference is not None and reference.shape == self.shape else None
        )
        self._building: np.ndarray | None = None
        self._reference_rows = 0
        self._reference_after = reference_after_seconds
        if self.reference is None:
            self.restart_reference(reference_after_seconds)

    def publish_counters(self) -> None:
        """Make the counters folded so far visible to scrapes (called once their offsets commit)."""
        self.visible_counters = (
            self.messages_total,
            self.context_counts.copy(),
            float(self.context_sum),
        )

    def matches_layout(self, header: MessageHeader) -> bool:
        """Return whether a message has this identity's layers, heads, KV heads and dtype."""
        return _layout(header) == self.layout

    def restart_reference(self, after_seconds: float) -> None:
        """Drop the reference and build a new one from rows with a timestamp >= after_seconds."""
        self.reference = None
        self.drift = DriftState.empty(self.shape)
        self._building = new_counts(self.shape)
        self._reference_rows = 0
        self._reference_after = after_seconds

    def fold(
        self, msg: HeadStatsMessage, sample: Sample, *, replay: bool, now_wall: float
    ) -> Reference | None:
        """Fold one message in; return a reference when this message completed one."""
        header = msg.header
        # A replayed message was produced long ago: it keeps the model alive only from when it was
        # sent, so a restart does not bring back, for another TTL, a model that had gone quiet.
        seen = min(now_wall, header.timestamp_seconds) if replay else now_wall
        self.last_fold_wall = seen if self.folded == 0 else max(self.last_fold_wall, seen)
        # S and R need no update: they are part of the identity (see `identity`).
        self.last_message_seconds = max(self.last_message_seconds, header.timestamp_seconds)
        if not replay:
            self.messages_total += 1
            bucket = int(np.searchsorted(CONTEXT_BUCKETS, header.context_tokens, side="left"))
            self.context_counts[bucket] += 1
            self.context_sum += header.context_tokens
        self.window.add(sample)
        self.folded += 1
        np.add.at(self._test.reshape(-1), sample.cells, 1)  # faster than fancy += in numpy 2
        self._test_rows += 1
        completed = self._grow_reference(sample.cells, header.timestamp_seconds)
        if self._test_rows >= self.policy.drift.window_samples:
            self._test_window(header.timestamp_seconds)
        if self.folded % self.policy.evaluate_every_samples == 0:
            self.evaluate_verdicts()
        return completed

    def _grow_reference(self, cells: np.ndarray, timestamp: float) -> Reference | None:
        if self._building is None or timestamp < self._reference_after:
            return None
        np.add.at(self._building.reshape(-1), cells, 1)
        self._reference_rows += 1
        if self._reference_rows < self.policy.drift.reference_samples:
            return None
        self.reference = Reference(
            model_key=self.model_key,
            model_name=self.model_name,
            samples=self._reference_rows,
            created_seconds=timestamp,
            pattern_counts=self._building[..., PATTERN_COLUMNS].copy(),
            entropy_counts=self._building[..., ENTROPY_COLUMNS].copy(),
        )
        self._building = None
        return self.reference

    def _test_window(self, timestamp: float) -> None:
        if self.reference is not None:
            self.drift = drift_step(
                self.drift,
                self._test[..., PATTERN_COLUMNS],
                self._test[..., ENTROPY_COLUMNS],
                self.reference.pattern_counts,
                self.reference.entropy_counts,
                self.policy.drift,
                timestamp,
            )
        self._test[...] = 0
        self._test_rows = 0

    def evaluate_verdicts(self) -> None:
        """Update the hysteresis state of the per-head verdicts from the current window, and which
        heads are unsafe on evidence (a head between the two bounds with no history, after a
        restart say, or one short of samples, is unsafe without being either)."""
        _, upper = eviction_quantiles(self.window.eviction_hist, self.policy.verdicts)
        counts = self.window.valid_counts
        self.safe = update_safe(self.safe, upper, counts, self.policy.verdicts)
        self.unsafe = measured_unsafe(upper, counts, self.policy.verdicts)

    def snapshot(self) -> ModelSnapshot:
        """Return the values to export now (copies; safe to render without the lock)."""
        layers, heads, num_kv, head_dim, dtype_bytes = self.layout
        quantile, _ = eviction_quantiles(self.window.eviction_hist, self.policy.verdicts)
        kv_safe = kv_head_safe(self.safe, num_kv)
        reference_pattern = (
            dominant(self.reference.pattern_counts, self.policy.patterns.dominance)
            if self.reference is not None
            else None
        )
        return ModelSnapshot(
            model_name=self.model_name,
            model_key=self.model_key,
            shape=self.shape,
            num_kv_heads=num_kv,
            means=self.window.means(),
            eviction_quantile=quantile,
            pattern=dominant(self.window.pattern_counts, self.policy.patterns.dominance),
            reference_pattern=reference_pattern,
            window_samples=self.window.size,
            valid_counts=self.window.valid_counts.copy(),
            reference_samples=self.reference.samples if self.reference is not None else 0,
            drift_threshold=self.policy.drift.threshold(layers * heads),
            drifted=self.drift.drifted.copy(),
            failing=self.drift.failing.copy(),
            drift_p_value=self.drift.p_value.copy(),
            drift_distance=self.drift.distance.copy(),
            drift_since_seconds=self.drift.since_seconds.copy(),
            kv_safe=kv_safe,
            kv_ready=kv_safe | kv_head_any(self.unsafe, num_kv),
            reclaimable_bytes=reclaimable_bytes(
                kv_safe,
                self.window.mean_visible_keys(),
                self.sink_tokens,
                self.recent_tokens,
                head_dim,
                dtype_bytes,
            ),
            messages_total=self.visible_counters[0],
            context_counts=self.visible_counters[1],
            context_sum=self.visible_counters[2],
            last_message_seconds=self.last_message_seconds,
            sink_tokens=self.sink_tokens,
            recent_tokens=self.recent_tokens,
        )
