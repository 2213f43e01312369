"""Model heads: layer x head matrices, the pattern map, per-layer pattern mix, safe and drifting heads."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import table
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.catalogue import REGIONS
from dashboards.config import GenerateConfig
from dashboards.layout import base_dashboard
from dashboards.matrix import matrix_panel
from dashboards.panels import (
    Step,
    label_variable,
    pattern_mappings,
    query,
    table_panel,
    timeseries_panel,
)
from dashboards.recording import HEAD_PATTERN_CODE

UID = "headwatch-model-heads"
M = 'model_name=~"$model_name"'
HEAD_DETAIL_LINK = (
    "/d/headwatch-head-detail/?var-datasource=${datasource}&var-model_name=${model_name}"
    "&var-layer=${__data.fields.layer}&var-head=${__data.fields.head}&${__url_time_range}"
)


def _matrix_style(
    metric: str, config: GenerateConfig
) -> tuple[str, str, float, float | None, list[Step]]:
    """Return (title, unit, min, max, threshold steps) for a per-head gauge's matrix."""
    d = config.dashboards
    styles: dict[str, tuple[str, str, float, float | None, list[Step]]] = {
        "headwatch_head_entropy_nats": ("Entropy (nats)", "none", 0.0, None, []),
        "headwatch_head_normalized_entropy_ratio": (
            "Normalised entropy (H / ln N)", "percentunit", 0.0, 1.0, []
        ),
        "headwatch_head_eviction_error_ratio": (
            "Eviction error p95 (sink+recent)",
            "percentunit",
            0.0,
            None,
            [(None, "green"), (d.eviction_error_warn, "yellow"), (d.eviction_error_bad, "red")],
        ),
        "headwatch_head_drift_p_value": ("Drift p-value", "none", 0.0, 1.0, []),
        "headwatch_head_drift_distance": ("Drift distance", "none", 0.0, None, []),
        "headwatch_head_drift_detected": (
            "Drift detected", "none", 0.0, 1.0, [(None, "green"), (1, "red")]
        ),
        "headwatch_head_drift_since_timestamp_seconds": (
            "Drifted since", "dateTimeAsIso", 0.0, None, []
        ),
        "headwatch_head_mass_ratio": ("Attention mass", "percentunit", 0.0, 1.0, []),
    }  # fmt: skip
    return styles[metric]


def _matrices(config: GenerateConfig) -> list[table.Panel]:
    panels = []
    for metric in config.dashboards.head_matrices:
        title, unit, lo, hi, steps = _matrix_style(metric, config)
        panels.append(
            matrix_panel(
                f"{title} by layer x head",
                f"{title} of every query head of the model in the current window.",
                f"max by (layer, head) ({metric}{{{M}}})",
                unit=unit,
                lo=lo,
                hi=hi,
                steps=steps,
            )
        )
    for region in REGIONS:
        panels.append(
            matrix_panel(
                f"{region.capitalize()} mass by layer x head",
                f"Share of each head's attention on the {region} tokens (0..1).",
                f'max by (layer, head) (headwatch_head_mass_ratio{{{M}, region="{region}"}})',
                unit="percentunit",
                lo=0.0,
                hi=1.0,
                width=8,
            )
        )
    return panels


def _drift_table() -> table.Panel:
    by = "max by (layer, head, kv_head)"
    tested = f"and on (layer, head, kv_head) {by} (headwatch_head_drift_p_value{{{M}}})"
    return (
        table_panel(
            "Drifting heads",
            "Heads under drift-test failure: drifted flag, p-value, distance and since when.",
            [
                query(
                    f"{by} (headwatch_head_drift_detected{{{M}}}) {tested}",
                    "A",
                    instant=True,
                    fmt="table",
                ),
                query(
                    f"{by} (headwatch_head_drift_p_value{{{M}}})", "B", instant=True, fmt="table"
                ),
                query(
                    f"{by} (headwatch_head_drift_distance{{{M}}})", "C", instant=True, fmt="table"
                ),
                query(
                    f"{by} (headwatch_head_drift_since_timestamp_seconds{{{M}}}) * 1000",
                    "D",
                    instant=True,
                    fmt="table",
                ),
            ],
            width=12,
        )
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "Value #A": "drifted",
                        "Value #B": "p-value",
                        "Value #C": "distance",
                        "Value #D": "drifted since",
                    },
                },
            )
        )
        .override_by_name(
            "drifted since", [dm.DynamicConfigValue(id_val="unit", value="dateTimeAsIso")]
        )
        .override_by_name("p-value", [dm.DynamicConfigValue(id_val="unit", value="sci")])
        .override_by_name(
            "drifted",
            [
                dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
                dm.DynamicConfigValue(
                    id_val="thresholds",
                    value={
                        "mode": "absolute",
                        "steps": [{"value": None, "color": "yellow"}, {"value": 1, "color": "red"}],
                    },
                ),
            ],
        )
        .data_links([db.DashboardLink("Head detail").url(HEAD_DETAIL_LINK)])
    )


def _safe_table(config: GenerateConfig) -> table.Panel:
    d = config.dashboards
    return (
        table_panel(
            "KV heads safe to compress",
            "KV heads whose every query head keeps sink+recent safely, with their worst p95 error.",
            [
                query(
                    "max by (layer, kv_head) "
                    f"(headwatch_head_eviction_error_ratio{{{M}}})\n"
                    "and on (layer, kv_head)\n"
                    f"(max by (layer, kv_head) (headwatch_kv_head_safe_to_compress{{{M}}}) == 1)",
                    instant=True,
                    fmt="table",
                )
            ],
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {"Value": "worst eviction error p95"},
                },
            )
        )
        .unit("percentunit")
        .override_by_name(
            "worst eviction error p95",
            [dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"})],
        )
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    dm.Threshold(value=None, color="green"),
                    dm.Threshold(value=d.eviction_error_warn, color="yellow"),
                    dm.Threshold(value=d.eviction_error_bad, color="red"),
                ]
            )
        )
    )


def build(config: GenerateConfig) -> db.Dashboard:
    """Return the model heads dashboard builder (one model at a time)."""
    dash = base_dashboard(UID, "headwatch / Model heads", config)
    dash = dash.with_variable(
        label_variable(
            "model_name", "label_values(headwatch_head_entropy_nats, model_name)", label="model"
        )
    ).with_variable(
        label_variable(
            "layer",
            f"label_values(headwatch_layer_pattern_heads{{{M}}}, layer)",
            multi=True,
        )
    )
    dash = dash.with_row(db.Row("Pattern map"))
    dash = dash.with_panel(
        matrix_panel(
            "Pattern by layer x head",
            "Each head's current attention pattern, coloured by pattern, named in the cell.",
            f"max by (layer, head) ({HEAD_PATTERN_CODE}{{{M}}})",
            unit="none",
            lo=None,
            hi=None,
            mappings=pattern_mappings(),
            width=24,
        )
    )
    dash = dash.with_row(db.Row("Head statistics"))
    for panel in _matrices(config):
        dash = dash.with_panel(panel)
    dash = dash.with_row(db.Row("Verdicts and drift"))
    dash = dash.with_panel(_safe_table(config)).with_panel(_drift_table())
    dash = dash.with_row(db.Row("Layer $layer pattern mix").repeat("layer"))
    return dash.with_panel(
        timeseries_panel(
            "Pattern mix of layer $layer",
            "How many query heads of this layer are in each pattern, over time.",
            [
                query(
                    f'sum by (pattern) (headwatch_layer_pattern_heads{{{M}, layer=~"$layer"}})',
                    legend="{{pattern}}",
                )
            ],
            "none",
            stacked=True,
            width=24,
        )
    )
