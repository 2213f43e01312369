"""Layer x head matrix panels: one row per layer, one column per head, for any model shape.

An instant query returns one series per (layer, head); Grafana's `groupingToMatrix` turns them
into a grid. Layer and head labels are strings, so they are converted to numbers and sorted by
`layer * 4096 + head` first: otherwise layer 10 would sort before layer 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import table
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.panels import DATASOURCE, NO_DATA, Step, query, thresholds

_ORDER_STRIDE = 4096  # more heads than any model has per layer


def _transformations(row: str, column: str) -> list[dm.DataTransformerConfig]:
    return [
        dm.DataTransformerConfig(
            id_val="convertFieldType",
            options={
                "conversions": [
                    {"targetField": row, "destinationType": "number"},
                    {"targetField": column, "destinationType": "number"},
                ]
            },
        ),
        dm.DataTransformerConfig(
            id_val="calculateField",
            options={
                "mode": "binary",
                "binary": {"left": row, "operator": "*", "right": str(_ORDER_STRIDE)},
                "alias": "row_key",
            },
        ),
        dm.DataTransformerConfig(
            id_val="calculateField",
            options={
                "mode": "binary",
                "binary": {"left": "row_key", "operator": "+", "right": column},
                "alias": "order",
            },
        ),
        dm.DataTransformerConfig(
            id_val="sortBy", options={"sort": [{"field": "order", "desc": False}]}
        ),
        dm.DataTransformerConfig(
            id_val="groupingToMatrix",
            options={
                "rowField": row,
                "columnField": column,
                "valueField": "Value",
                "emptyValue": "null",
            },
        ),
    ]


def matrix_panel(
    title: str,
    intent: str,
    expr: str,
    *,
    unit: str,
    lo: float | None,
    hi: float | None,
    steps: Sequence[Step] = (),
    mappings: list[dm.ValueMapping] | None = None,
    column: str = "head",
    width: int = 12,
) -> table.Panel:
    """Return a layer x `column` grid of `expr`'s instant values, cells coloured by value.

    `expr` must return one series per (layer, column) carrying both labels. With `steps` the
    colours come from thresholds; without, from a continuous scale between `lo` and `hi`.
    """
    colour = (
        db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS)
        if steps or mappings
        else db.FieldColor().mode(dm.FieldColorModeId("continuous-BlYlRd"))
    )
    panel = (
        table.Panel()
        .title(title)
        .description(intent)
        .datasource(DATASOURCE)
        .with_target(query(expr, instant=True, fmt="table", legend="__auto"))
        .unit(unit)
        .decimals(2)
        .thresholds(thresholds(steps or [(None, "text")]))
        .color_scheme(colour)
        .cell_options(cm.TableColoredBackgroundCellOptions())
        .cell_height(cm.TableCellHeight.SM)
        .align(cm.FieldTextAlignment.CENTER)
        .no_value(NO_DATA)
        .span(width)
        .height(10)
    )
    # The grid's first column holds the layer numbers: plain text, not a coloured cell.
    panel = panel.override_by_name(
        f"layer\\{column}",
        [
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "auto"}),
            dm.DynamicConfigValue(id_val="unit", value="none"),
            dm.DynamicConfigValue(id_val="decimals", value=0),
            dm.DynamicConfigValue(id_val="displayName", value=f"layer \\ {column}"),
        ],
    )
    for transformation in _transformations("layer", column):
        panel = panel.with_transformation(transformation)
    if lo is not None:
        panel = panel.min(lo)
    if hi is not None:
        panel = panel.max(hi)
    if mappings:
        panel = panel.mappings(mappings)
    return panel
