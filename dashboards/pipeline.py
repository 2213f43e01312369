"""Pipeline health: collector throughput and drops, exporter lag and rejects, scrape durations."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from dashboards.config import GenerateConfig
from dashboards.layout import base_dashboard
from dashboards.panels import NO_PIPELINE_DATA, label_variable, query, timeseries_panel
from dashboards.recording import COLLECTOR_DROPPED_RATE

UID = "headwatch-pipeline"
M = '{model_name=~"$model_name"}'
RI = "[$__rate_interval]"


def _collector(dash: db.Dashboard, config: GenerateConfig) -> db.Dashboard:
    dash = dash.with_row(db.Row("Collector (inside the serving processes)"))
    dash = dash.with_panel(
        timeseries_panel(
            "Sampled, published and dropped",
            "Per model: forward passes measured, messages acknowledged by Kafka, messages dropped.",
            [
                query(
                    f"sum by (model_name) (rate(headwatch_collector_sampled_total{M}{RI}))",
                    legend="{{model_name}} sampled",
                ),
                query(
                    f"sum by (model_name) (rate(headwatch_collector_published_total{M}{RI}))",
                    ref="B",
                    legend="{{model_name}} published",
                ),
                query(
                    f"sum by (model_name, reason) ({COLLECTOR_DROPPED_RATE}{M})",
                    ref="C",
                    legend="{{model_name}} dropped ({{reason}})",
                ),
            ],
            "reqps",
            no_value=NO_PIPELINE_DATA,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Publisher queue depth",
            "Messages waiting in each collector's bounded queue (one per serving process, shared by "
            "its models, so not filtered by model); a full queue drops, never blocks.",
            [
                query(
                    "sum by (instance) (headwatch_collector_queue_messages)",
                    legend="{{instance}}",
                )
            ],
            "none",
            width=8,
            no_value=NO_PIPELINE_DATA,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Publisher queue bytes",
            "Bytes waiting in each collector's queue.",
            [
                query(
                    "sum by (instance) (headwatch_collector_queue_bytes)",
                    legend="{{instance}}",
                )
            ],
            "bytes",
            width=8,
            no_value=NO_PIPELINE_DATA,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Hook errors and hook state",
            "Exceptions caught inside the attention hook per second; hook enabled (1) or off (0); "
            "passes the collector could not measure per second, by reason (continuous batching, "
            "an attention function set after attach).",
            [
                query(
                    f"sum by (model_name) (rate(headwatch_collector_hook_errors_total{M}{RI}))",
                    legend="{{model_name}} errors/s",
                ),
                query(
                    f"min by (model_name) (headwatch_collector_hook_enabled{M})",
                    ref="B",
                    legend="{{model_name}} enabled",
                ),
                query(
                    "sum by (model_name, reason) "
                    f"(rate(headwatch_collector_unmeasured_passes_total{M}{RI}))",
                    ref="C",
                    legend="{{model_name}} unmeasured ({{reason}})/s",
                ),
            ],
            "short",
            steps=[(None, "green"), (0.01, "red")],
            width=8,
            no_value=NO_PIPELINE_DATA,
        )
    )
    return dash.with_panel(
        timeseries_panel(
            "Statistics time per sampled pass (p50, p95)",
            "Time the collector spends computing head statistics on a sampled forward pass.",
            [
                query(
                    "histogram_quantile(0.5, sum by (model_name, le) "
                    f"(rate(headwatch_collector_stats_seconds_bucket{M}{RI})))",
                    legend="{{model_name}} p50",
                ),
                query(
                    "histogram_quantile(0.95, sum by (model_name, le) "
                    f"(rate(headwatch_collector_stats_seconds_bucket{M}{RI})))",
                    ref="B",
                    legend="{{model_name}} p95",
                ),
            ],
            "s",
            width=24,
            no_value=NO_PIPELINE_DATA,
        )
    )


def _exporter(dash: db.Dashboard, config: GenerateConfig) -> db.Dashboard:
    lag = config.alerts.exporter_lag.messages
    dash = dash.with_row(db.Row("Exporter"))
    dash = dash.with_panel(
        timeseries_panel(
            "Consumer lag",
            "End offset minus consumed position per partition; lag means stale verdicts.",
            [
                query(
                    "max by (topic, partition) (headwatch_exporter_consumer_lag_messages)",
                    legend="{{topic}}[{{partition}}]",
                )
            ],
            "none",
            steps=[(None, "green"), (lag, "red")],
            no_value=NO_PIPELINE_DATA,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Messages consumed, duplicates, dead letters",
            "Per second: messages consumed, redeliveries skipped, messages sent to the DLQ.",
            [
                query(f"sum(rate(headwatch_exporter_messages_total{RI}))", legend="consumed"),
                query(
                    f"sum(rate(headwatch_exporter_duplicate_messages_total{RI}))",
                    ref="B",
                    legend="duplicates",
                ),
                query(
                    f"sum(rate(headwatch_exporter_dead_letters_total{RI}))",
                    ref="C",
                    legend="dead letters",
                ),
            ],
            "reqps",
            no_value=NO_PIPELINE_DATA,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Invalid messages by reason",
            "Messages rejected per second, by reason; any steady rate points at a bad producer.",
            [
                query(
                    f"sum by (reason) (rate(headwatch_exporter_invalid_messages_total{RI}))",
                    legend="{{reason}}",
                )
            ],
            "reqps",
            steps=[(None, "green"), (0.01, "red")],
            no_value=NO_PIPELINE_DATA,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Time since last consumed message",
            "Seconds since each replica consumed a message; grows when producers or Kafka stall.",
            [
                query(
                    "time() - headwatch_exporter_last_message_timestamp_seconds",
                    legend="{{instance}}",
                )
            ],
            "s",
            steps=[(None, "green"), (config.alerts.telemetry_absent.silence_seconds, "red")],
            no_value=NO_PIPELINE_DATA,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Partitions, active series, dropped series",
            "Partitions each replica owns, per-head series exported, series cut by the budget/s.",
            [
                query(
                    "sum by (instance) (headwatch_exporter_assigned_partitions)",
                    legend="{{instance}} partitions",
                ),
                query(
                    "sum by (instance) (headwatch_exporter_active_series)",
                    ref="B",
                    legend="{{instance}} active series",
                ),
                query(
                    f"sum by (instance) (rate(headwatch_exporter_series_dropped_total{RI}))",
                    ref="C",
                    legend="{{instance}} dropped series/s",
                ),
            ],
            "short",
            no_value=NO_PIPELINE_DATA,
        )
    )
    return dash.with_panel(
        timeseries_panel(
            "Window rebuild time",
            "How long the last rebuild of the windows from Kafka took, per replica.",
            [
                query(
                    "max by (instance) (headwatch_exporter_rebuild_seconds)", legend="{{instance}}"
                )
            ],
            "s",
            no_value=NO_PIPELINE_DATA,
        )
    )


def build(config: GenerateConfig) -> db.Dashboard:
    """Return the pipeline health dashboard builder."""
    jobs = f"{config.exporter_job}|{config.collector_job}"
    dash = base_dashboard(UID, "headwatch / Pipeline health", config).with_variable(
        label_variable(
            "model_name",
            "label_values(headwatch_collector_sampled_total, model_name)",
            multi=True,
            label="model",
        )
    )
    dash = _exporter(_collector(dash, config), config)
    dash = dash.with_row(db.Row("Prometheus scrapes"))
    dash = dash.with_panel(
        timeseries_panel(
            "Scrape duration",
            "How long Prometheus takes to scrape each headwatch target (exporter and collectors).",
            [query(f'scrape_duration_seconds{{job=~"{jobs}"}}', legend="{{job}} {{instance}}")],
            "s",
            steps=[(None, "green"), (5, "red")],
            no_value=NO_PIPELINE_DATA,
        )
    )
    return dash.with_panel(
        timeseries_panel(
            "Targets up",
            "1 when Prometheus scraped the target successfully, 0 when the scrape failed.",
            [query(f'up{{job=~"{jobs}"}}', legend="{{job}} {{instance}}")],
            "none",
            hi=1.0,
            steps=[(None, "red"), (1, "green")],
            no_value=NO_PIPELINE_DATA,
        )
    )
