"""Head detail: one query head's statistics over time and its pattern and verdict timelines."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common as cm

from dashboards.config import GenerateConfig
from dashboards.layout import base_dashboard
from dashboards.panels import (
    label_variable,
    pattern_mappings,
    query,
    safe_mappings,
    state_panel,
    timeseries_panel,
)
from dashboards.recording import HEAD_PATTERN_CODE

UID = "headwatch-head-detail"
M = 'model_name=~"$model_name"'
H = f'{M}, layer="$layer", head="$head"'


def _variables(dash: db.Dashboard) -> db.Dashboard:
    return (
        dash.with_variable(
            label_variable(
                "model_name", "label_values(headwatch_head_entropy_nats, model_name)", label="model"
            )
        )
        .with_variable(
            label_variable("layer", f"label_values(headwatch_head_entropy_nats{{{M}}}, layer)")
        )
        .with_variable(
            label_variable(
                "head",
                f'label_values(headwatch_head_entropy_nats{{{M}, layer="$layer"}}, head)',
            )
        )
    )


def build(config: GenerateConfig) -> db.Dashboard:
    """Return the head detail dashboard builder (variables model_name, layer, head)."""
    d = config.dashboards
    dash = _variables(base_dashboard(UID, "headwatch / Head detail", config))
    dash = dash.with_panel(
        state_panel(
            "Pattern timeline",
            "The head's attention pattern over time; a colour change is a pattern change.",
            f"max by (layer, head) ({HEAD_PATTERN_CODE}{{{H}}})",
            "layer {{layer}} head {{head}}",
            pattern_mappings(),
        )
    )
    dash = dash.with_panel(
        state_panel(
            "KV head verdict",
            "Whether the KV head this query head reads from is safe to keep only sink+recent.",
            "max by (layer, kv_head) "
            f'(headwatch_kv_head_safe_to_compress{{{M}, layer="$layer"}})\n'
            "and on (layer, kv_head)\n"
            f"max by (layer, kv_head) (headwatch_head_entropy_nats{{{H}}})",
            "layer {{layer}} kv head {{kv_head}}",
            safe_mappings(),
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Entropy",
            "Mean attention entropy in nats; exp(H) tokens is the effective span.",
            [query(f"max by (layer, head) (headwatch_head_entropy_nats{{{H}}})", legend="H")],
            "none",
            width=8,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Normalised entropy",
            "Entropy over ln(visible keys): 1 is uniform attention, near 0 a few tokens.",
            [
                query(
                    f"max by (layer, head) (headwatch_head_normalized_entropy_ratio{{{H}}})",
                    legend="H / ln N",
                )
            ],
            "percentunit",
            hi=1.0,
            width=8,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Eviction error p95",
            "Value-aware output error if the head kept only sink+recent tokens (p95).",
            [
                query(
                    f"max by (layer, head) (headwatch_head_eviction_error_ratio{{{H}}})",
                    legend="error p95",
                )
            ],
            "percentunit",
            steps=[
                (None, "green"),
                (d.eviction_error_warn, "yellow"),
                (d.eviction_error_bad, "red"),
            ],
            width=8,
        ).thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.LINE))
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Attention mass by region",
            "Share of attention on sink, recent and middle tokens (stacks to 1).",
            [
                query(
                    f"max by (region) (headwatch_head_mass_ratio{{{H}}})",
                    legend="{{region}}",
                )
            ],
            "percentunit",
            hi=1.0,
            stacked=True,
        )
    )
    dash = dash.with_panel(
        timeseries_panel(
            "Drift test p-value",
            "p-value of the last drift test against the model's alpha (below alpha = failing).",
            [
                query(
                    f"max by (layer, head) (headwatch_head_drift_p_value{{{H}}})",
                    legend="p-value",
                ),
                query(
                    f"max by (model_name) (headwatch_model_drift_alpha{{{M}}})",
                    ref="B",
                    legend="alpha",
                ),
            ],
            "none",
            lo=None,
            hi=1.0,
            no_value="no drift test failing for this head",
        ).scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10))
    )
    return dash.with_panel(
        timeseries_panel(
            "Drift distance",
            "Effect size of the last drift test (exported only while the test fails).",
            [
                query(
                    f"max by (layer, head) (headwatch_head_drift_distance{{{H}}})",
                    legend="distance",
                )
            ],
            "none",
            no_value="no drift test failing for this head",
            width=24,
        )
    )
