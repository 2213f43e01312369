"""Settings of the local stack, read from HEADWATCH_STACK_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Defaults are the ports every Kafka/Prometheus tutorial uses; 0 means "any free port".
DEFAULT_KAFKA_PORT = 9092
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_ALERTMANAGER_PORT = 9093


class StackSettings(BaseSettings):
    """Ports, heap and timeouts of the local stack.

    Usage:
        settings = StackSettings()                      # defaults + HEADWATCH_STACK_* env
        settings = StackSettings(kafka_port=0)          # any free port
    """

    model_config = SettingsConfigDict(env_prefix="HEADWATCH_STACK_", frozen=True, extra="forbid")

    kafka_port: int = Field(default=DEFAULT_KAFKA_PORT, ge=0, le=65535)
    kafka_controller_port: int = Field(default=0, ge=0, le=65535)
    prometheus_port: int = Field(default=DEFAULT_PROMETHEUS_PORT, ge=0, le=65535)
    alertmanager_port: int = Field(default=DEFAULT_ALERTMANAGER_PORT, ge=0, le=65535)
    # A preferred port that is busy falls back to a free one; strict ports fail instead.
    strict_ports: bool = False
    kafka_heap: str = Field(default="512m", pattern=r"^[0-9]+[kmgKMG]$")
    kafka_partitions: int = Field(default=3, ge=1, le=1000)
    scrape_interval_seconds: float = Field(default=1.0, gt=0, le=3600)
    start_timeout_seconds: float = Field(default=120.0, gt=0)
    stop_timeout_seconds: float = Field(default=20.0, gt=0)
    alertmanager_webhook_url: str | None = None
    cache_dir: Path | None = None
