"""Generation-time check that every query reads only metrics something actually emits."""

from __future__ import annotations

from collections.abc import Iterable

from dashboards.catalogue import PROMETHEUS_BUILTINS, exported_names
from dashboards.errors import UnknownMetricError
from dashboards.promql import metric_names
from dashboards.recording import recorded_names


def known_names() -> frozenset[str]:
    """Return the names a query may select: exported, recorded and Prometheus's own."""
    return exported_names() | recorded_names() | PROMETHEUS_BUILTINS


def check_queries(queries: Iterable[tuple[str, str]]) -> None:
    """Raise UnknownMetricError for the first (where, expr) pair that reads an unknown metric."""
    known = known_names()
    for where, expr in queries:
        unknown = sorted(metric_names(expr) - known)
        if unknown:
            raise UnknownMetricError(
                f"{where}: expected metrics from docs/metrics.md or a recording rule, "
                f"got unknown metric(s) {', '.join(unknown)} in {expr!r}"
            )
