"""Every PromQL expression the project ships, ready to run against a live Prometheus.

The end-to-end test evaluates each of them: `all_queries` lists dashboard targets, variable
queries, alert and recording rules; `substitute` replaces Grafana's template variables with
concrete values the way Grafana would before sending the query.

Usage:
    for q in all_queries(GenerateConfig()):
        prometheus_query(substitute(q.expr, {"model_name": "tiny"}))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from dashboards.alerts import alert_rules
from dashboards.config import GenerateConfig
from dashboards.generate import DASHBOARDS, build_dashboard, dashboard_queries
from dashboards.promql import metric_names
from dashboards.recording import recording_rules

Source = Literal["dashboard", "variable", "alert", "recording"]

# Grafana's built-in interval variables, replaced by values that suit a short test range.
GRAFANA_BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "__range_s": "300",
}
# Series that exist only after something went wrong (a drift test failing, a bad message, a
# dropped message, a firing alert): a healthy pipeline may legitimately return nothing for them.
FAULT_ONLY_METRICS: frozenset[str] = frozenset(
    {
        "headwatch_head_drift_p_value",
        "headwatch_head_drift_distance",
        "headwatch_head_drift_since_timestamp_seconds",
        "headwatch_exporter_invalid_messages_total",
        "headwatch_collector_dropped_total",
        "model_name_reason:headwatch_collector_dropped:rate5m",
        "ALERTS",
    }
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class Query:
    """One shipped PromQL expression and where it lives."""

    source: Source
    where: str
    expr: str

    @property
    def expects_data(self) -> bool:
        """Whether a healthy, reporting pipeline must return at least one series for this query.

        Alert expressions return series only while their condition holds; queries over
        FAULT_ONLY_METRICS only after a fault, unless they fall back to `or vector(0)`.
        """
        if self.source == "alert":
            return False
        if "or vector(0)" in self.expr:
            return True
        return not (metric_names(self.expr) & FAULT_ONLY_METRICS)


def all_queries(config: GenerateConfig) -> list[Query]:
    """Return every dashboard, variable, alert and recording-rule expression for `config`."""
    found: list[Query] = []
    for builder in DASHBOARDS.values():
        model = build_dashboard(builder, config)
        for where, expr in dashboard_queries(model):
            source: Source = "variable" if " / variable " in where else "dashboard"
            found.append(Query(source, where, expr))
    found += [Query("alert", f"alert {r.alert}", r.expr) for r in alert_rules(config)]
    found += [Query("recording", f"record {r.record}", r.expr) for r in recording_rules()]
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Return `expr` with `$name` / `${name}` replaced by `values` or Grafana's built-ins.

    Values are inserted as Grafana does for a single selection; an unknown variable raises
    KeyError so a test never sends a query with a literal `$` in it.
    """
    merged = {**GRAFANA_BUILTINS, **values}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return merged[name]

    return _VARIABLE.sub(replace, expr)


def to_json(queries: list[Query]) -> str:
    """Return the queries as JSON (for tools outside Python)."""
    return json.dumps([{**q.__dict__, "expects_data": q.expects_data} for q in queries], indent=2)
