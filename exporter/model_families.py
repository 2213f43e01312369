"""The per-model and per-layer metric families of one scrape (part of the Prometheus adapter)."""

from __future__ import annotations

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from exporter.patterns import PATTERNS
from exporter.snapshot import CONTEXT_BUCKETS, ModelSnapshot


class ModelFamilies:
    """Per-model and per-layer families, filled model by model."""

    def __init__(self) -> None:
        m = ["model_name"]
        self.gauges = {
            "kv_heads": GaugeMetricFamily("headwatch_model_kv_heads", "KV heads of the model", labels=m),
            "kv_safe": GaugeMetricFamily("headwatch_model_kv_heads_safe", "KV heads currently safe to compress", labels=m),
            "bytes": GaugeMetricFamily("headwatch_model_kv_reclaimable_bytes", "KV bytes per sequence freed if every safe KV head kept only sink+recent", labels=m),
            "drifted": GaugeMetricFamily("headwatch_model_heads_drifted", "Query heads currently drifted", labels=m),
            "changed": GaugeMetricFamily("headwatch_model_heads_pattern_changed", "Query heads whose pattern differs from the reference", labels=m),
            "pattern": GaugeMetricFamily("headwatch_model_pattern_heads", "Query heads in each pattern", labels=[*m, "pattern"]),
            "layer": GaugeMetricFamily("headwatch_layer_pattern_heads", "Query heads of one layer in each pattern", labels=[*m, "layer", "pattern"]),
            "window": GaugeMetricFamily("headwatch_model_window_samples", "Sampled rows in the current window", labels=m),
            "reference": GaugeMetricFamily("headwatch_model_reference_samples", "Sampled rows in the drift reference", labels=m),
            "alpha": GaugeMetricFamily("headwatch_model_drift_alpha", "Per-head threshold of the drift p-value", labels=m),
            "last": GaugeMetricFamily("headwatch_model_last_message_timestamp_seconds", "Producer timestamp of the newest message", labels=m),
            "sink": GaugeMetricFamily("headwatch_model_sink_tokens", "Sink tokens S of the keep-set, newest message", labels=m),
            "recent": GaugeMetricFamily("headwatch_model_recent_tokens", "Recent tokens R of the keep-set, newest message", labels=m),
        }  # fmt: skip
        self.messages = CounterMetricFamily(
            "headwatch_model_messages", "Head-stats messages folded in", labels=m
        )
        self.context = HistogramMetricFamily(
            "headwatch_model_context_tokens", "Context length of the sampled requests", labels=m
        )

    @staticmethod
    def count(layers: int) -> int:
        """Return the series one model adds outside the per-head ones."""
        return 12 + 2 * len(PATTERNS) + layers * len(PATTERNS) + 1 + len(CONTEXT_BUCKETS) + 3

    def add(self, model: str, s: ModelSnapshot) -> None:
        """Add one model's series."""
        g = self.gauges
        kv_total = int(s.kv_safe.size)
        for key, value in (
            ("kv_heads", kv_total), ("kv_safe", int(s.kv_safe.sum())), ("bytes", s.reclaimable_bytes),
            ("drifted", int(s.drifted.sum())), ("changed", s.heads_pattern_changed),
            ("window", s.window_samples), ("reference", s.reference_samples),
            ("alpha", s.drift_threshold), ("last", s.last_message_seconds),
            ("sink", s.sink_tokens), ("recent", s.recent_tokens),
        ):  # fmt: skip
            g[key].add_metric([model], float(value))
        measured = s.valid_counts > 0
        for code, name in enumerate(PATTERNS):
            hit = (s.pattern == code) & measured
            g["pattern"].add_metric([model, name], float(hit.sum()))
            for layer, n in enumerate(hit.sum(axis=1).tolist()):
                g["layer"].add_metric([model, str(layer), name], float(n))
        self.messages.add_metric([model], s.messages_total)
        cumulative = np.cumsum(s.context_counts).tolist()
        buckets = [(f"{b:.0f}", c) for b, c in zip(CONTEXT_BUCKETS, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        self.context.add_metric([model], buckets, s.context_sum)

    def families(self) -> list[Metric]:
        """Return the filled families."""
        return [*self.gauges.values(), self.messages, self.context]
