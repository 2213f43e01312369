"""Errors raised by the dashboards package: bad generation config, stale files, Grafana failures."""

from __future__ import annotations


class DashboardsError(Exception):
    """Base class of every error the dashboards package raises on purpose."""


class ConfigError(DashboardsError, ValueError):
    """The generation config is invalid (unknown metric, threshold out of range, bad duration)."""


class UnknownMetricError(ConfigError):
    """A query names a metric that neither the exporter, the collector nor a recording rule emits."""


class StaleFilesError(DashboardsError):
    """Committed generated files differ from what the generator produces now."""


class GrafanaError(DashboardsError):
    """The Grafana HTTP API refused a request or could not be reached."""
