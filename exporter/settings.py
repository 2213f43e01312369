"""Exporter settings from the environment (`HEADWATCH_EXPORTER_...`, nested with `__`).

Usage:
    settings = ExporterSettings()  # e.g. HEADWATCH_EXPORTER_KAFKA__BOOTSTRAP_SERVERS=broker:9092
    policy = settings.aggregate_policy()

Read once at the composition root (exporter.cli); everything below it gets plain values.
Defaults work against the local stack (Kafka on 127.0.0.1:9092).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from collector.schema import DEAD_LETTER_TOPIC, TOPIC
from exporter.drift import DriftPolicy
from exporter.model_state import AggregatePolicy
from exporter.patterns import PatternThresholds
from exporter.verdicts import VerdictPolicy

REFERENCE_TOPIC = f"{TOPIC}.reference"

Ratio = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """Where to consume from and how."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = TOPIC
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    reference_topic: str = REFERENCE_TOPIC
    group_id: str = "headwatch-exporter"
    client_id: str = "headwatch-exporter"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    max_poll_records: Positive = 250
    # kafka-python 3.0.12 can lose a SyncGroup reply when polls are short (a stuck rebalance).
    poll_timeout_ms: Positive = 1_000
    session_timeout_ms: Positive = 10_000
    heartbeat_interval_ms: Positive = 3_000
    max_poll_interval_ms: Positive = 300_000
    request_timeout_ms: Positive = 30_000
    metadata_max_age_ms: Positive = 300_000
    fetch_max_wait_ms: Positive = 500
    # A 32 x 32 message is 10-16 KB: kafka-python's 1 MiB default would fetch 64 at a time.
    max_partition_fetch_bytes: Positive = 8 << 20
    # Partitions of the reference topic when the exporter creates it (compacted).
    reference_partitions: Positive = 1
    # Seconds to reach the broker at start-up before exiting non-zero.
    startup_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # CRC checks need the `crc32c` C extension to keep up; without it kafka-python's pure-Python
    # CRC costs more than decoding. The payload carries zlib's own checksum either way.
    check_crcs: bool = True


class HttpSettings(_Section):
    """Where /metrics and /healthz listen."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464
    # /healthz fails when the consumer loop has not turned for this long.
    stall_seconds: Annotated[float, Field(gt=0)] = 60.0


class WindowSettings(_Section):
    """Count windows per model, bounded in time by the horizon replayed after a restart."""

    samples: Annotated[int, Field(ge=16, le=65536)] = 512
    horizon_seconds: Annotated[float, Field(gt=0)] = 3600.0
    model_ttl_seconds: Annotated[float, Field(gt=0)] = 900.0
    max_heads_per_model: Annotated[int, Field(ge=1, le=1 << 20)] = 16384
    evaluate_every_samples: Positive = 64
    # A message stamped further ahead of this replica's clock is rejected (`out_of_range`): one
    # wrong clock must not push a model's window past every honest message.
    max_future_seconds: Annotated[float, Field(ge=0)] = 300.0


class PatternSettings(_Section):
    """Classification cut-offs; defaults and their origin in exporter/patterns.py."""

    uniform_min_normalized_entropy: Ratio = 0.90
    sink_min_mass: Ratio = 0.80
    recency_min_mass: Ratio = 0.80
    v_shaped_min_mass: Ratio = 0.80
    v_shaped_min_each: Ratio = 0.10
    middle_min_mass: Ratio = 0.50
    concentrated_top_k: Positive = 16
    concentrated_min_top_mass: Ratio = 0.50
    concentrated_max_entropy_nats: Annotated[float, Field(ge=0)] = 2.0
    scattered_top_k: Positive = 256
    scattered_min_top_mass: Ratio = 0.30
    scattered_min_entropy_nats: Annotated[float, Field(ge=0)] = 3.0
    scattered_max_entropy_nats: Annotated[float, Field(ge=0)] = 8.0
    dominance: Ratio = 0.5


class VerdictSettings(_Section):
    """Safe-to-compress: quantile of the eviction error, bounds with hysteresis."""

    quantile: Annotated[float, Field(gt=0, lt=1)] = 0.95
    enter_bound: Annotated[float, Field(gt=0, lt=1)] = 0.05
    exit_bound: Annotated[float, Field(gt=0, lt=1)] = 0.08
    min_samples: Positive = 100
    confidence_z: Annotated[float, Field(ge=0)] = 1.645


class DriftSettings(_Section):
    """Drift test: count windows, family-wise alpha, effect-size floor, persistence."""

    window_samples: Annotated[int, Field(ge=16)] = 256
    min_head_samples: Positive = 100
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01
    min_distance: Ratio = 0.10
    consecutive_windows: Positive = 3
    reference_samples: Annotated[int, Field(ge=16)] = 1024


class MetricsSettings(_Section):
    """Series budget and label bounds."""

    head_series_budget: Annotated[int, Field(ge=1, le=11)] = 8
    max_series: Positive = 250_000
    max_label_chars: Annotated[int, Field(ge=16, le=4096)] = 128


class ExporterSettings(BaseSettings):
    """All exporter settings; every field can be set as HEADWATCH_EXPORTER_<SECTION>__<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix="HEADWATCH_EXPORTER_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    http: HttpSettings = HttpSettings()
    window: WindowSettings = WindowSettings()
    patterns: PatternSettings = PatternSettings()
    verdicts: VerdictSettings = VerdictSettings()
    drift: DriftSettings = DriftSettings()
    metrics: MetricsSettings = MetricsSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _upper_log_level(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("log_level"), str):
            return {**data, "log_level": data["log_level"].upper()}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ExporterSettings:
        """Refuse combinations under which a feature could never work, naming both fields."""
        v, d, w = self.verdicts, self.drift, self.window
        if v.enter_bound > v.exit_bound:
            raise ValueError(
                "expected VERDICTS__ENTER_BOUND <= VERDICTS__EXIT_BOUND (hysteresis), "
                f"got {v.enter_bound} > {v.exit_bound}"
            )
        if v.min_samples > w.samples:
            raise ValueError(
                "expected VERDICTS__MIN_SAMPLES <= WINDOW__SAMPLES (no head could ever be safe), "
                f"got {v.min_samples} > {w.samples}"
            )
        if d.min_head_samples > d.window_samples:
            raise ValueError(
                "expected DRIFT__MIN_HEAD_SAMPLES <= DRIFT__WINDOW_SAMPLES (no head could ever be "
                f"tested), got {d.min_head_samples} > {d.window_samples}"
            )
        return self

    def aggregate_policy(self) -> AggregatePolicy:
        """Return the pure-core policy these settings describe."""
        return AggregatePolicy(
            window_samples=self.window.samples,
            horizon_seconds=self.window.horizon_seconds,
            model_ttl_seconds=self.window.model_ttl_seconds,
            max_heads_per_model=self.window.max_heads_per_model,
            evaluate_every_samples=self.window.evaluate_every_samples,
            max_future_seconds=self.window.max_future_seconds,
            patterns=PatternThresholds(**self.patterns.model_dump()),
            verdicts=VerdictPolicy(**self.verdicts.model_dump()),
            drift=DriftPolicy(**self.drift.model_dump()),
        )
