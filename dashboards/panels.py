"""Shared pieces of every dashboard: datasource, variables, queries, thresholds and panel kinds.

Every panel gets a description (its one-line intent, also written to docs/dashboards.md), a unit,
a range where one makes sense, thresholds, and a no-value text so it reads correctly when a model
stops reporting.
"""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from dashboards.catalogue import PATTERNS
from dashboards.recording import PATTERN_CODES

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
NO_DATA = "no data: model not reporting or series expired"
NO_PIPELINE_DATA = "no data: component not scraped"

# One colour per pattern, shared by the pattern map and the pattern timeline.
PATTERN_COLOURS: dict[str, str] = {
    "uniform": "purple",
    "v_shaped": "green",
    "sink": "blue",
    "recency": "yellow",
    "scattered_middle": "orange",
    "concentrated_middle": "red",
    "mixed": "text",
}
Step = tuple[float | None, str]


def datasource_variable() -> db.DatasourceVariable:
    """Return the `datasource` variable: any Prometheus datasource."""
    return db.DatasourceVariable("datasource").label("Prometheus").type("prometheus")


def label_variable(
    name: str, query: str, *, multi: bool = False, label: str | None = None
) -> db.QueryVariable:
    """Return a variable listing a label's values; `multi` adds multi-select and All."""
    variable = (
        db.QueryVariable(name)
        .label(label or name)
        .datasource(DATASOURCE)
        .query({"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.NATURAL_ASC)
    )
    if multi:
        variable = variable.multi(True).include_all(True).all_value(".+")
    return variable


def query(
    expr: str, ref: str = "A", legend: str = "__auto", *, instant: bool = False, fmt: str = ""
) -> prom.Dataquery:
    """Return a Prometheus query; `fmt` is `table` or `heatmap` where the panel needs it."""
    q = prom.Dataquery().expr(expr).ref_id(ref).legend_format(legend).datasource(DATASOURCE)
    q = q.instant() if instant else q.range()
    if fmt:
        q = q.format(pm.PromQueryFormat(fmt))
    return q


def thresholds(steps: Sequence[Step]) -> db.ThresholdsConfig:
    """Return absolute thresholds; the first step's value is None (the base colour)."""
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=colour) for value, colour in steps])
    )


def pattern_mappings() -> list[dm.ValueMapping]:
    """Return value mappings from a pattern code (recording rule) to its name and colour."""
    options = {
        str(PATTERN_CODES[name]): dm.ValueMappingResult(
            text=name, color=PATTERN_COLOURS[name], index=i
        )
        for i, name in enumerate(PATTERNS)
    }
    return [dm.ValueMap(options=options)]


def safe_mappings() -> list[dm.ValueMapping]:
    """Return value mappings for a 0/1 safe-to-compress verdict."""
    return [
        dm.ValueMap(
            options={
                "0": dm.ValueMappingResult(text="keep full cache", color="red", index=0),
                "1": dm.ValueMappingResult(text="safe: sink+recent", color="green", index=1),
            }
        )
    ]


def stat_panel(
    title: str, intent: str, expr: str, unit: str, steps: Sequence[Step], *, width: int = 4
) -> stat.Panel:
    """Return a single-value panel showing the latest value of `expr`."""
    return (
        stat.Panel()
        .title(title)
        .description(intent)
        .datasource(DATASOURCE)
        .with_target(query(expr, legend="__auto"))
        .unit(unit)
        .thresholds(thresholds(steps))
        .no_value(NO_DATA)
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
        .span(width)
        .height(4)
    )


def timeseries_panel(
    title: str,
    intent: str,
    targets: Sequence[prom.Dataquery],
    unit: str,
    *,
    lo: float | None = 0.0,
    hi: float | None = None,
    steps: Sequence[Step] = ((None, "green"),),
    stacked: bool = False,
    width: int = 12,
    no_value: str = NO_DATA,
) -> timeseries.Panel:
    """Return a time series panel with its unit, range and thresholds set."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(intent)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .unit(unit)
        .thresholds(thresholds(steps))
        .no_value(no_value)
        .fill_opacity(30 if stacked else 10)
        .legend(
            cb.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.RIGHT)
            .calcs(["lastNotNull", "max"])
        )
        .span(width)
        .height(8)
    )
    if lo is not None:
        panel = panel.min(lo)
    if hi is not None:
        panel = panel.max(hi)
    if stacked:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    return panel


def state_panel(
    title: str, intent: str, expr: str, legend: str, mappings: list[dm.ValueMapping]
) -> statetimeline.Panel:
    """Return a state timeline whose values are coloured by value mappings."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(intent)
        .datasource(DATASOURCE)
        .with_target(query(expr, legend=legend))
        .mappings(mappings)
        .thresholds(thresholds([(None, "text")]))
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .no_value(NO_DATA)
        .show_value(cm.VisibilityMode.AUTO)
        .merge_values(True)
        .span(24)
        .height(5)
    )


def table_panel(
    title: str, intent: str, targets: Sequence[prom.Dataquery], *, width: int = 12
) -> table.Panel:
    """Return a table of instant query results (one row per series)."""
    return (
        table.Panel()
        .title(title)
        .description(intent)
        .datasource(DATASOURCE)
        .targets(list(targets))
        .thresholds(thresholds([(None, "text")]))
        .no_value(NO_DATA)
        .cell_height(cm.TableCellHeight.SM)
        .span(width)
        .height(9)
    )
