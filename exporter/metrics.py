"""Prometheus adapter: a custom collector that renders a fresh snapshot on every scrape.

Usage:
    registry = CollectorRegistry()
    registry.register(HeadwatchCollector(source.scrape_view, SeriesLimits()))

Names and labels are those of docs/metrics.md. Per-head series are limited by a budget per head
(in the priority order of `_HEAD_SERIES`) and by a hard cap on the total; whatever does not fit is
counted in `headwatch_exporter_series_dropped_total`, which grows at each scrape by the series that
scrape left out (so its rate times the scrape interval is the number of series missing now).
Values carry no timestamps.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter.labels import safe_label
from exporter.model_families import ModelFamilies
from exporter.patterns import PATTERNS
from exporter.snapshot import (
    ENTROPY,
    MIDDLE,
    NORMALIZED_ENTROPY,
    RECENT,
    SINK,
    ModelSnapshot,
)

logger = logging.getLogger(__name__)

INVALID_REASONS = (
    "decode", "schema_version", "shape", "non_finite", "out_of_range", "oversized",
    "unknown_stat", "validation",
)  # fmt: skip
WRITE_KINDS = ("dead_letter", "reference")  # what the exporter writes to Kafka (exporter.outbox)
_HEAD_LABELS = ["model_name", "layer", "head", "kv_head"]

# Per-head series in priority order: (metric, help, region label or None, kind). Kind "drift"
# series exist only for heads whose last drift test failed or that are drifted; "since" only for
# drifted heads. With the default budget of 8 a quiet head exports all of its 8 series, and a
# drifted head keeps its drift details and gives up its last masses.
_HEAD_SERIES: tuple[tuple[str, str, str | None, str], ...] = (
    ("headwatch_head_pattern", "1 for the head's current pattern", None, "pattern"),
    (
        "headwatch_head_eviction_error_ratio",
        "High quantile of the sink+recent eviction error",
        None,
        "evict",
    ),
    (
        "headwatch_head_drift_detected",
        "1 when the head drifted for enough consecutive windows",
        None,
        "detected",
    ),
    ("headwatch_head_drift_p_value", "p-value of the last drift test", None, "drift"),
    (
        "headwatch_head_drift_distance",
        "Jensen-Shannon distance of the last drift test",
        None,
        "drift",
    ),
    ("headwatch_head_drift_since_timestamp_seconds", "When the head became drifted", None, "since"),
    (
        "headwatch_head_entropy_nats",
        "Mean attention entropy of the head's sampled rows",
        None,
        "mean",
    ),
    ("headwatch_head_mass_ratio", "Mean probability mass per region", "sink", "mean"),
    ("headwatch_head_mass_ratio", "Mean probability mass per region", "recent", "mean"),
    ("headwatch_head_mass_ratio", "Mean probability mass per region", "middle", "mean"),
    ("headwatch_head_normalized_entropy_ratio", "Mean of entropy / ln(visible keys)", None, "mean"),
)
_MEAN_CHANNEL = {
    "headwatch_head_entropy_nats": ENTROPY,
    "headwatch_head_normalized_entropy_ratio": NORMALIZED_ENTROPY,
    "sink": SINK,
    "recent": RECENT,
    "middle": MIDDLE,
}


@dataclass(frozen=True)
class SeriesLimits:
    """Per-head budget, hard cap on all series and label length."""

    head_series_budget: int = 8
    max_series: int = 250_000
    max_label_chars: int = 128


@dataclass(frozen=True)
class ExporterStats:
    """The replica's own counters and gauges, copied by the consumer for one scrape."""

    messages_total: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    stale: int = 0
    dead_letters: int = 0
    abandoned: dict[str, int] = field(default_factory=dict)
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    assigned_partitions: int = 0
    last_message_wall: float = 0.0
    rebuild_seconds: float = 0.0


ScrapeView = Callable[[], tuple[list[ModelSnapshot], ExporterStats]]


@functools.lru_cache(maxsize=32)
def _head_labels(layers: int, heads: int, kv_heads: int) -> tuple[tuple[str, str, str], ...]:
    group = heads // kv_heads
    return tuple((str(i), str(h), str(h // group)) for i in range(layers) for h in range(heads))


def _head_ranks(s: ModelSnapshot) -> list[np.ndarray]:
    """Return, per _HEAD_SERIES entry, each head's position in its own candidate list (-1: n/a)."""
    shows_drift = (s.failing | s.drifted).ravel()
    drifted = (s.drifted & np.isfinite(s.drift_since_seconds)).ravel()
    measured = (s.valid_counts > 0).ravel()
    position = np.zeros(shows_drift.shape, dtype=np.int64)
    ranks = []
    for _, _, _, kind in _HEAD_SERIES:
        applies = {"drift": shows_drift, "since": drifted}.get(kind, measured)
        ranks.append(np.where(applies, position, -1))
        position = position + applies
    return ranks


class HeadwatchCollector(Collector):
    """Builds every headwatch metric family from `view()` at each scrape."""

    def __init__(self, view: ScrapeView, limits: SeriesLimits) -> None:
        self._view = view
        self._limits = limits
        self._lock = threading.Lock()
        self.series_dropped_total = 0
        self.active_series = 0

    def describe(self) -> list[Metric]:
        """Return nothing, so that registering does not trigger a scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Return the metric families of one scrape."""
        snapshots, stats = self._view()
        with self._lock:
            families, active, dropped = self._render_models(snapshots)
            self.series_dropped_total += dropped
            self.active_series = active
            yield from families
            yield from self._self_metrics(stats)

    def _render_models(self, snapshots: list[ModelSnapshot]) -> tuple[list[Metric], int, int]:
        fam: dict[str, GaugeMetricFamily] = {}

        def family(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            if name not in fam:
                fam[name] = GaugeMetricFamily(name, doc, labels=labels)
            return fam[name]

        model_fams = ModelFamilies()
        left = self._limits.max_series
        active = dropped = 0
        for s in snapshots:
            model = safe_label(s.model_name, self._limits.max_label_chars)
            layers, heads = s.shape
            model_series = model_fams.count(layers)
            if model_series > left:
                dropped += model_series + layers * heads * self._limits.head_series_budget
                continue
            left -= model_series
            model_fams.add(model, s)
            labels = _head_labels(layers, heads, s.num_kv_heads)
            ranks = _head_ranks(s)
            included = [r >= 0 for r in ranks]
            in_budget = [(r >= 0) & (r < self._limits.head_series_budget) for r in ranks]
            per_head = np.sum(in_budget, axis=0)
            dropped += int(np.sum(included) - np.sum(per_head))
            fits = np.cumsum(per_head) <= left
            dropped += int(per_head[~fits].sum())
            taken = int(per_head[fits].sum())
            left -= taken
            active += taken
            self._add_heads(family, model, s, labels, [m & fits for m in in_budget])
            # Both or neither: the unsafe alert needs the two together.
            kv_series = (
                ("headwatch_kv_head_safe_to_compress",
                 "1 when every query head of the KV head is safe for sink+recent", s.kv_safe),
                ("headwatch_kv_head_verdict_ready",
                 "1 when the KV head is safe, or unsafe on evidence (enough samples, error above the exit bound)",
                 s.kv_ready),
            )  # fmt: skip
            size = 2 * s.kv_safe.size
            if size > left:
                dropped += size
                continue
            left -= size
            kv_heads = s.num_kv_heads
            for name, doc, values in kv_series:
                kv_fam = family(name, doc, ["model_name", "layer", "kv_head"])
                for i, v in enumerate(values.ravel().tolist()):
                    kv_fam.add_metric([model, str(i // kv_heads), str(i % kv_heads)], float(v))
        return [*fam.values(), *model_fams.families()], active, dropped

    def _add_heads(
        self,
        family: Callable[..., GaugeMetricFamily],
        model: str,
        s: ModelSnapshot,
        labels: tuple[tuple[str, str, str], ...],
        masks: list[np.ndarray],
    ) -> None:
        for (name, doc, region, kind), mask in zip(_HEAD_SERIES, masks, strict=True):
            extra = ["region"] if region else ["pattern"] if kind == "pattern" else []
            f = family(name, doc, _HEAD_LABELS + extra)
            idx = np.flatnonzero(mask).tolist()
            if not idx:
                continue
            if kind == "pattern":
                codes = s.pattern.ravel()
                for i in idx:
                    f.add_metric([model, *labels[i], PATTERNS[codes[i]]], 1.0)
                continue
            values = _head_values(s, name, region, kind).ravel().tolist()
            tail = [region] if region else []
            for i in idx:
                f.add_metric([model, *labels[i], *tail], values[i])

    def _self_metrics(self, st: ExporterStats) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "headwatch_exporter_messages",
            "Messages consumed (valid or not)",
            value=st.messages_total,
        )
        invalid = CounterMetricFamily(
            "headwatch_exporter_invalid_messages", "Messages rejected, by reason", labels=["reason"]
        )
        for reason in INVALID_REASONS:
            invalid.add_metric([reason], st.invalid.get(reason, 0))
        yield invalid
        yield CounterMetricFamily(
            "headwatch_exporter_duplicate_messages",
            "Redelivered messages skipped",
            value=st.duplicates,
        )
        yield CounterMetricFamily(
            "headwatch_exporter_stale_messages",
            "Messages older than the window horizon behind their model's newest, skipped",
            value=st.stale,
        )
        yield CounterMetricFamily(
            "headwatch_exporter_dead_letters",
            "Messages sent to the dead-letter topic (acknowledged by the broker)",
            value=st.dead_letters,
        )
        abandoned = CounterMetricFamily(
            "headwatch_exporter_writes_abandoned",
            "Records the broker refused on every attempt, given up, by kind",
            labels=["kind"],
        )
        for kind in WRITE_KINDS:
            abandoned.add_metric([kind], st.abandoned.get(kind, 0))
        yield abandoned
        lag = GaugeMetricFamily(
            "headwatch_exporter_consumer_lag_messages",
            "End offset minus consumed position",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(st.lag.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield GaugeMetricFamily(
            "headwatch_exporter_assigned_partitions",
            "Partitions this replica owns",
            value=st.assigned_partitions,
        )
        yield GaugeMetricFamily(
            "headwatch_exporter_last_message_timestamp_seconds",
            "When the replica last consumed a message",
            value=st.last_message_wall,
        )
        yield GaugeMetricFamily(
            "headwatch_exporter_active_series",
            "Per-head series exported on the last scrape",
            value=self.active_series,
        )
        yield CounterMetricFamily(
            "headwatch_exporter_series_dropped",
            "Series not exported (budget or hard cap)",
            value=self.series_dropped_total,
        )
        yield GaugeMetricFamily("headwatch_exporter_rebuild_seconds", "Time the last window rebuild from Kafka took", value=st.rebuild_seconds)  # fmt: skip


def _head_values(s: ModelSnapshot, name: str, region: str | None, kind: str) -> np.ndarray:
    if kind == "evict":
        return s.eviction_quantile
    if kind == "detected":
        return s.drifted.astype(np.float64)
    if name == "headwatch_head_drift_p_value":
        return s.drift_p_value
    if name == "headwatch_head_drift_distance":
        return s.drift_distance
    if kind == "since":
        return s.drift_since_seconds
    return s.means[_MEAN_CHANNEL[region or name]]
