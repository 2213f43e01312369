"""The metric names dashboards and rules may query: docs/metrics.md as data, plus Prometheus's own.

A unit test keeps this table equal to docs/metrics.md, the contract with the exporter and collector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricType = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class Metric:
    """One exported metric: its name, type and label names."""

    name: str
    type: MetricType
    labels: tuple[str, ...] = ()


_HEAD = ("model_name", "layer", "head", "kv_head")
_MODEL = ("model_name",)

METRICS: tuple[Metric, ...] = (
    # exporter, per head
    Metric("headwatch_head_entropy_nats", "gauge", _HEAD),
    Metric("headwatch_head_normalized_entropy_ratio", "gauge", _HEAD),
    Metric("headwatch_head_mass_ratio", "gauge", (*_HEAD, "region")),
    Metric("headwatch_head_eviction_error_ratio", "gauge", _HEAD),
    Metric("headwatch_head_pattern", "gauge", (*_HEAD, "pattern")),
    Metric("headwatch_head_drift_detected", "gauge", _HEAD),
    Metric("headwatch_head_drift_p_value", "gauge", _HEAD),
    Metric("headwatch_head_drift_distance", "gauge", _HEAD),
    Metric("headwatch_head_drift_since_timestamp_seconds", "gauge", _HEAD),
    # exporter, per KV head and per model
    Metric("headwatch_kv_head_safe_to_compress", "gauge", ("model_name", "layer", "kv_head")),
    Metric("headwatch_kv_head_verdict_ready", "gauge", ("model_name", "layer", "kv_head")),
    Metric("headwatch_model_kv_heads", "gauge", _MODEL),
    Metric("headwatch_model_kv_heads_safe", "gauge", _MODEL),
    Metric("headwatch_model_kv_reclaimable_bytes", "gauge", _MODEL),
    Metric("headwatch_model_heads_drifted", "gauge", _MODEL),
    Metric("headwatch_model_heads_pattern_changed", "gauge", _MODEL),
    Metric("headwatch_model_pattern_heads", "gauge", ("model_name", "pattern")),
    Metric("headwatch_layer_pattern_heads", "gauge", ("model_name", "layer", "pattern")),
    Metric("headwatch_model_window_samples", "gauge", _MODEL),
    Metric("headwatch_model_reference_samples", "gauge", _MODEL),
    Metric("headwatch_model_drift_alpha", "gauge", _MODEL),
    Metric("headwatch_model_messages_total", "counter", _MODEL),
    Metric("headwatch_model_context_tokens", "histogram", _MODEL),
    Metric("headwatch_model_last_message_timestamp_seconds", "gauge", _MODEL),
    Metric("headwatch_model_sink_tokens", "gauge", _MODEL),
    Metric("headwatch_model_recent_tokens", "gauge", _MODEL),
    # exporter, self-metrics
    Metric("headwatch_exporter_messages_total", "counter"),
    Metric("headwatch_exporter_invalid_messages_total", "counter", ("reason",)),
    Metric("headwatch_exporter_duplicate_messages_total", "counter"),
    Metric("headwatch_exporter_stale_messages_total", "counter"),
    Metric("headwatch_exporter_dead_letters_total", "counter"),
    Metric("headwatch_exporter_writes_abandoned_total", "counter", ("kind",)),
    Metric("headwatch_exporter_consumer_lag_messages", "gauge", ("topic", "partition")),
    Metric("headwatch_exporter_assigned_partitions", "gauge"),
    Metric("headwatch_exporter_last_message_timestamp_seconds", "gauge"),
    Metric("headwatch_exporter_active_series", "gauge"),
    Metric("headwatch_exporter_series_dropped_total", "counter"),
    Metric("headwatch_exporter_rebuild_seconds", "gauge"),
    # collector
    Metric("headwatch_collector_sampled_total", "counter", _MODEL),
    Metric("headwatch_collector_published_total", "counter", _MODEL),
    Metric("headwatch_collector_dropped_total", "counter", ("model_name", "reason")),
    Metric("headwatch_collector_queue_messages", "gauge"),
    Metric("headwatch_collector_queue_bytes", "gauge"),
    Metric("headwatch_collector_stats_seconds", "histogram", _MODEL),
    Metric("headwatch_collector_hook_errors_total", "counter", _MODEL),
    Metric("headwatch_collector_hook_enabled", "gauge", _MODEL),
    Metric("headwatch_collector_unmeasured_passes_total", "counter", ("model_name", "reason")),
)

# Series Prometheus itself writes for every scrape target, and the alert state it records.
PROMETHEUS_BUILTINS: frozenset[str] = frozenset({"up", "scrape_duration_seconds", "ALERTS"})

PATTERNS: tuple[str, ...] = (
    "uniform",
    "v_shaped",
    "sink",
    "recency",
    "scattered_middle",
    "concentrated_middle",
    "mixed",
)
REGIONS: tuple[str, ...] = ("sink", "recent", "middle")


def exported_names() -> frozenset[str]:
    """Return every series name the exporter and collector expose, histogram series included."""
    names: set[str] = set()
    for metric in METRICS:
        if metric.type == "histogram":
            names.update(f"{metric.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(metric.name)
    return frozenset(names)


def per_head_gauges() -> frozenset[str]:
    """Return the per-head gauges whose value a layer x head matrix can show."""
    return frozenset(
        m.name for m in METRICS if m.labels[:4] == _HEAD and m.name != "headwatch_head_pattern"
    )
