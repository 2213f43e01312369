"""Fleet overview: every model's traffic, context lengths, compressible KV heads, drift, pipeline."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import heatmap as hm

from dashboards.config import GenerateConfig
from dashboards.layout import base_dashboard
from dashboards.panels import (
    DATASOURCE,
    NO_DATA,
    label_variable,
    query,
    stat_panel,
    thresholds,
    timeseries_panel,
)
from dashboards.recording import CONTEXT_BUCKET_RATE, MESSAGES_RATE, SAFE_RATIO

UID = "headwatch-fleet"
M = '{model_name=~"$model_name"}'


def _context_heatmap() -> heatmap.Panel:
    return (
        heatmap.Panel()
        .title("Context length distribution")
        .description("How long the sampled requests' contexts are, per time bucket (tokens).")
        .datasource(DATASOURCE)
        .with_target(
            query(f"sum by (le) ({CONTEXT_BUCKET_RATE}{M})", legend="{{le}}", fmt="heatmap")
        )
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("short").axis_label("context tokens"))
        .color(heatmap.HeatmapColorOptions().scheme("Oranges").mode(hm.HeatmapColorMode.SCHEME))
        .cell_values(heatmap.CellValues().unit("reqps"))
        .show_value(cm.VisibilityMode.NEVER)
        .thresholds(thresholds([(None, "text")]))
        .no_value(NO_DATA)
        .span(12)
        .height(8)
    )


def build(config: GenerateConfig) -> db.Dashboard:
    """Return the fleet overview dashboard builder."""
    silence = config.alerts.telemetry_absent.silence_seconds
    min_heads = config.alerts.drift.min_heads
    exporter = f'job="{config.exporter_job}"'
    dash = base_dashboard(UID, "headwatch / Fleet overview", config).with_variable(
        label_variable(
            "model_name",
            "label_values(headwatch_model_messages_total, model_name)",
            multi=True,
            label="model",
        )
    )
    dash = dash.with_row(db.Row("Models"))
    dash = dash.with_panel(
        stat_panel(
            "Models reporting",
            f"Models whose newest head statistics are younger than {silence}s.",
            f"count((time() - max by (model_name) "
            f"(headwatch_model_last_message_timestamp_seconds{M})) < {silence}) or vector(0)",
            "none",
            [(None, "red"), (1, "green")],
        )
    )
    dash = dash.with_panel(
        stat_panel(
            "Sampled requests/s",
            "Head-statistics messages folded in per second, all selected models.",
            f"sum({MESSAGES_RATE}{M})",
            "reqps",
            [(None, "blue")],
        )
    )
    dash = dash.with_panel(
        stat_panel(
            "KV heads safe to compress",
            "Share of KV heads whose every query head is safe to keep only sink+recent tokens.",
            f"sum(max by (model_name) (headwatch_model_kv_heads_safe{M})) "
            f"/ sum(max by (model_name) (headwatch_model_kv_heads{M}))",
            "percentunit",
            [(None, "text"), (0.25, "green")],
        )
    )
    dash = dash.with_panel(
        stat_panel(
            "KV bytes reclaimable",
            "KV bytes per sequence freed if every safe KV head kept only sink+recent, summed.",
            f"sum(max by (model_name) (headwatch_model_kv_reclaimable_bytes{M}))",
            "bytes",
            [(None, "blue")],
        )
    )
    dash = dash.with_panel(
        stat_panel(
            "Heads drifted",
            f"Query heads failing their drift test; the drift alert needs {min_heads} in one model.",
            f"sum(max by (model_name) (headwatch_model_heads_drifted{M}))",
            "none",
            [(None, "green"), (1, "yellow"), (min_heads, "red")],
        )
    )
    dash = dash.with_panel(
        stat_panel(
            "Alerts firing",
            "headwatch alerts currently firing (all severities).",
            'count(ALERTS{alertstate="firing", team="headwatch"}) or vector(0)',
            "none",
            [(None, "green"), (1, "red")],
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Sampled requests/s by model",
            "Rate of head-statistics messages per model: the sampled traffic headwatch sees.",
            [query(f"{MESSAGES_RATE}{M}", legend="{{model_name}}")],
            "reqps",
        )
    )
    dash = dash.with_panel(_context_heatmap())
    dash = dash.with_row(db.Row("Compression and drift"))
    dash = dash.with_panel(
        timeseries_panel(
            "Share of KV heads safe to compress",
            "Per model, safe KV heads over all KV heads; drops mean verdicts were withdrawn.",
            [query(f"{SAFE_RATIO}{M}", legend="{{model_name}}")],
            "percentunit",
            hi=1.0,
            width=8,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "KV bytes reclaimable per sequence",
            "Per model, KV bytes a sequence would free at the observed context length.",
            [
                query(
                    f"max by (model_name) (headwatch_model_kv_reclaimable_bytes{M})",
                    legend="{{model_name}}",
                )
            ],
            "bytes",
            width=8,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Heads drifted and heads whose pattern changed",
            "Per model, drifted query heads (solid) and heads off their reference pattern.",
            [
                query(
                    f"max by (model_name) (headwatch_model_heads_drifted{M})",
                    legend="{{model_name}} drifted",
                ),
                query(
                    f"max by (model_name) (headwatch_model_heads_pattern_changed{M})",
                    ref="B",
                    legend="{{model_name}} pattern changed",
                ),
            ],
            "none",
            steps=[(None, "green"), (min_heads, "red")],
            width=8,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Pattern mix",
            "Query heads in each attention pattern, summed over the selected models.",
            [
                query(
                    f"sum by (pattern) (max by (model_name, pattern) (headwatch_model_pattern_heads{M}))",
                    legend="{{pattern}}",
                )
            ],
            "none",
            stacked=True,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Window and reference samples",
            "Sampled rows in each model's current window and drift reference (0: no reference yet,"
            " drift cannot be tested).",
            [
                query(
                    f"max by (model_name) (headwatch_model_window_samples{M})",
                    legend="{{model_name}} window",
                ),
                query(
                    f"max by (model_name) (headwatch_model_reference_samples{M})",
                    ref="B",
                    legend="{{model_name}} reference",
                ),
            ],
            "none",
        )
    )
    dash = dash.with_row(db.Row("Pipeline health"))
    dash = dash.with_panel(
        stat_panel(
            "Exporter replicas up",
            "Exporter targets Prometheus scrapes successfully.",
            f"sum(up{{{exporter}}}) or vector(0)",
            "none",
            [(None, "red"), (1, "green")],
            width=6,
        )
    )
    dash = dash.with_panel(
        stat_panel(
            "Collector drops/s",
            "Messages the collectors dropped per second (full queue, broker unreachable).",
            f"sum(rate(headwatch_collector_dropped_total{M}[$__rate_interval])) or vector(0)",
            "reqps",
            [(None, "green"), (0.01, "red")],
            width=6,
        )
    )
    dash = dash.with_panel(
        stat_panel(
            "Exporter consumer lag",
            "Largest partition lag of any exporter replica (messages).",
            "max(headwatch_exporter_consumer_lag_messages)",
            "none",
            [(None, "green"), (config.alerts.exporter_lag.messages, "red")],
            width=6,
        )
    )
    return dash.with_panel(
        stat_panel(
            "Invalid messages/s",
            "Messages the exporter rejected per second, all reasons.",
            "sum(rate(headwatch_exporter_invalid_messages_total[$__rate_interval])) or vector(0)",
            "reqps",
            [(None, "green"), (0.01, "red")],
            width=6,
        )
    )
