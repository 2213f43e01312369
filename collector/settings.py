"""Collector settings, read from keyword arguments and `HEADWATCH_COLLECTOR_*` environment variables.

Usage:
    settings = load_settings(sample_rate=1.0)           # keyword arguments win over the environment
    HEADWATCH_COLLECTOR_KAFKA__BOOTSTRAP_SERVERS=host:9092 headwatch run -- python serve.py
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from collector.errors import SettingsError
from collector.schema import DEFAULT_TOP_K, MAX_MIDDLE_KEYS, TOPIC, core_stat_names

_TOP_K = re.compile(r"^top([1-9][0-9]*)_mass$")
_KNOWN_STATS = frozenset({"middle_mass", *core_stat_names((), learned_sinks=True)})


class KafkaSettings(BaseModel):
    """Where and how the publisher sends messages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = TOPIC
    acks: Literal["0", "1", "all"] = "1"
    compression_type: Literal["gzip", "lz4", "zstd", "none"] = "lz4"
    queue_max_messages: Annotated[int, Field(ge=1)] = 10_000
    queue_max_bytes: Annotated[int, Field(ge=1024)] = 64 << 20
    producer_buffer_bytes: Annotated[int, Field(ge=1024)] = 8 << 20
    flush_timeout_seconds: Annotated[float, Field(ge=0)] = 5.0
    request_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    reconnect_backoff_seconds: Annotated[float, Field(gt=0)] = 1.0


class CollectorSettings(BaseSettings):
    """Everything the collector needs; each field is validated at attach time."""

    model_config = SettingsConfigDict(
        env_prefix="HEADWATCH_COLLECTOR_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.01
    min_context_tokens: Annotated[int, Field(ge=0)] = 512
    # 4 sink tokens, as in StreamingLLM.
    sink_tokens: Annotated[int, Field(ge=0)] = 4
    # 256 recent tokens: at 16K context sink+recent keeps 1.6% of the cache (a 60x saving), a
    # window of a few hundred tokens covers the current paragraph, and it equals the largest
    # top-k, so recent_mass and top256_mass compare like for like.
    recent_tokens: Annotated[int, Field(ge=0)] = 256
    top_k: tuple[Annotated[int, Field(ge=1)], ...] = DEFAULT_TOP_K
    stats: tuple[str, ...] | None = None
    # Positions (never content) of this many largest middle keys per head, in each message;
    # 0 (the default) collects none. Each adds about 6 bytes x layers x heads to a message.
    top_middle_positions: Annotated[int, Field(ge=0, le=MAX_MIDDLE_KEYS)] = 0
    decode_every: Annotated[int, Field(ge=0)] = 0
    max_decode_samples: Annotated[int, Field(ge=0)] = 8
    layers: tuple[Annotated[int, Field(ge=0)], ...] | None = None
    max_sampled_passes_per_second: Annotated[float, Field(gt=0)] = 2.0
    # Keys per chunk of the statistics: their extra memory is O(rows x heads x chunk). A remainder
    # under an eighth of a chunk joins the first one, which then holds up to 1.125 x chunk_keys.
    # On a GPU a layer of one chunk takes the sync-free device path; at 128K keys on an H200 two
    # chunks of 64K took 1.8-3.7x the time of one. The default keeps up to 147K keys in one chunk.
    chunk_keys: Annotated[int, Field(ge=256)] = 131072
    max_consecutive_errors: Annotated[int, Field(ge=1)] = 10
    error_log_interval_seconds: Annotated[float, Field(ge=0)] = 60.0
    model_name: str = ""
    model_revision: str = ""
    server_id: str = ""
    sink: Literal["kafka", "file", "memory"] = "kafka"
    file_path: str = "headwatch-head-stats.jsonl"
    kafka: KafkaSettings = KafkaSettings()
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    metrics_address: str = "127.0.0.1"
    seed: int | None = None

    @field_validator("top_k")
    @classmethod
    def _distinct_top_k(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("expected at least one k, got ()")
        return tuple(sorted(set(value)))

    @field_validator("stats")
    @classmethod
    def _known_stats(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for name in value:
            if name not in _KNOWN_STATS and not _TOP_K.match(name):
                raise ValueError(
                    f"expected statistic names from {sorted(_KNOWN_STATS)} or top<k>_mass, got {name!r}"
                )
        return value

    def effective_top_k(self) -> tuple[int, ...]:
        """Return the top-k set: from `stats` names when given, else `top_k`."""
        if self.stats is None:
            return self.top_k
        ks = sorted({int(m.group(1)) for n in self.stats if (m := _TOP_K.match(n))})
        return tuple(ks) or self.top_k


def load_settings(base: CollectorSettings | None = None, **overrides: Any) -> CollectorSettings:
    """Return validated settings (environment, then `base`, then keyword overrides).

    Raises SettingsError naming the field, what was expected and what arrived.
    """
    fields = base.model_dump(exclude_unset=True) if base is not None else {}
    fields.update(overrides)
    try:
        return CollectorSettings(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        if first["type"] == "extra_forbidden":
            known = sorted(CollectorSettings.model_fields)
            raise SettingsError(
                f"{where}: expected one of {known}, got {where}={first.get('input')!r}"
            ) from exc
        message = str(first["msg"]).removeprefix("Value error, ")
        if message.startswith("expected") and ", got " in message:
            raise SettingsError(f"{where}: {message}") from exc
        message = message.replace("Input should be", "a value", 1)
        raise SettingsError(f"{where}: expected {message}, got {first.get('input')!r}") from exc
