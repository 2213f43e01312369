"""The generation config: alert thresholds and dashboard choices, validated before anything is written.

Every field has a default, so `GenerateConfig()` generates the committed files. A YAML file can
override any of them (`headwatch dashboards generate --config headwatch-dashboards.yaml`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from dashboards.catalogue import per_head_gauges
from dashboards.errors import ConfigError

_DURATION = re.compile(r"^(?:\d+(?:ms|[smhdwy]))+$")


def _check_duration(value: str) -> str:
    if not _DURATION.match(value):
        raise ValueError(f"expected a Prometheus duration such as 5m or 1h30m, got {value!r}")
    return value


Duration = Annotated[str, AfterValidator(_check_duration)]
Severity = Literal["info", "warning", "critical"]
Ratio = Annotated[float, Field(gt=0.0, le=1.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class AlertTiming(_Frozen):
    """How long a condition must hold (`for`) and how long the alert outlives it."""

    for_: Duration = Field(default="10m", alias="for")
    keep_firing_for: Duration = "10m"
    severity: Severity = "warning"


class DriftAlert(AlertTiming):
    """Sustained pattern drift on several heads of one model; never pages on one head."""

    min_heads: int = Field(default=3, ge=2, le=1_000_000)
    for_: Duration = Field(default="15m", alias="for")


class SafeHeadLostAlert(AlertTiming):
    """A KV head that was safe to compress within `lookback` is now unsafe."""

    lookback: Duration = "1h"
    for_: Duration = Field(default="5m", alias="for")
    keep_firing_for: Duration = "30m"
    severity: Severity = "critical"


class TelemetryAbsentAlert(AlertTiming):
    """A model that was reporting within `lookback` has sent nothing for `silence_seconds`."""

    silence_seconds: int = Field(default=600, ge=60, le=86_400)
    lookback: Duration = "2h"
    for_: Duration = Field(default="5m", alias="for")


class RatioAlert(AlertTiming):
    """A ratio of bad to all messages above `ratio` over `window`."""

    ratio: Ratio = 0.01
    window: Duration = "10m"


class LagAlert(AlertTiming):
    """Consumer lag of an exporter replica above `messages` on one topic."""

    messages: int = Field(default=10_000, ge=1, le=10**12)


class BlindCollectorAlert(AlertTiming):
    """A collector that met passes it cannot measure (continuous batching, an attention function
    it does not wrap) and measured none over `window`."""

    window: Duration = "30m"
    for_: Duration = Field(default="30m", alias="for")


class AlertsConfig(_Frozen):
    """Thresholds of every alert rule; `disabled` names alerts to leave out."""

    drift: DriftAlert = DriftAlert()
    safe_head_lost: SafeHeadLostAlert = SafeHeadLostAlert()
    telemetry_absent: TelemetryAbsentAlert = TelemetryAbsentAlert()
    collector_dropping: RatioAlert = RatioAlert(ratio=0.05, window="10m")
    invalid_messages: RatioAlert = RatioAlert(ratio=0.01, window="15m")
    exporter_lag: LagAlert = LagAlert()
    exporter_down: AlertTiming = AlertTiming.model_validate({"for": "5m", "severity": "critical"})
    hook_disabled: AlertTiming = AlertTiming.model_validate({"for": "1m"})
    collector_blind: BlindCollectorAlert = BlindCollectorAlert()
    disabled: tuple[str, ...] = ()


class DashboardsConfig(_Frozen):
    """Choices that shape the dashboards: which per-head gauges get a layer x head matrix."""

    head_matrices: tuple[str, ...] = (
        "headwatch_head_entropy_nats",
        "headwatch_head_normalized_entropy_ratio",
        "headwatch_head_eviction_error_ratio",
    )
    eviction_error_warn: Ratio = 0.01
    eviction_error_bad: Ratio = 0.05
    refresh: Duration = "30s"

    @field_validator("head_matrices")
    @classmethod
    def _known_head_gauges(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        known = per_head_gauges()
        for name in names:
            if name not in known:
                raise ValueError(
                    f"head_matrices: expected a per-head gauge of docs/metrics.md "
                    f"({', '.join(sorted(known))}), got unknown metric {name!r}"
                )
        return names


class GenerateConfig(_Frozen):
    """Everything `headwatch dashboards generate` reads; the defaults produce the committed files."""

    alerts: AlertsConfig = AlertsConfig()
    dashboards: DashboardsConfig = DashboardsConfig()
    exporter_job: str = Field(
        default="headwatch-exporter", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$"
    )
    collector_job: str = Field(
        default="headwatch-collector", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$"
    )
    # Grafana-managed copies of the alerts (optional): which Prometheus datasource and folder.
    grafana_datasource_uid: str = Field(
        default="headwatch-prometheus", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$"
    )
    grafana_folder_uid: str = Field(
        default="headwatch", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$"
    )
    runbook_base_url: str = Field(
        default="https://github.com/headwatch/headwatch/blob/main/docs/runbooks.md", min_length=1
    )


def parse_config(data: dict[str, Any]) -> GenerateConfig:
    """Validate a config mapping, raising ConfigError that names each bad field."""
    try:
        config = GenerateConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid dashboards config: {problems}") from None
    if config.dashboards.eviction_error_warn >= config.dashboards.eviction_error_bad:
        raise ConfigError(
            "dashboards.eviction_error_warn must be below eviction_error_bad, got "
            f"{config.dashboards.eviction_error_warn} >= {config.dashboards.eviction_error_bad}"
        )
    return config


def load_config(path: Path | None) -> GenerateConfig:
    """Read a YAML config file (or return the defaults when `path` is None)."""
    if path is None:
        return GenerateConfig()
    import yaml  # the dashboards extra ships PyYAML; imported here so the catalogue needs none

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read dashboards config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"dashboards config {path}: expected a mapping, got {type(data).__name__}"
        )
    return parse_config(data)
