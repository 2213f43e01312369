"""What `headwatch policy --from-metrics` reads from an exporter's /metrics: verdicts, errors, S and R.

Usage:
    verdicts = read_verdicts(fetch_metrics("http://127.0.0.1:9464/metrics"), "tiny", where=url)
    sink, recent = verdicts.keep_set(sink_tokens=None, recent_tokens=64)   # a flag wins

Pure apart from `fetch_metrics`; builds no policy (headwatch.policy does).
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from headwatch.report.errors import PolicyError

SAFE_METRIC = "headwatch_kv_head_safe_to_compress"
ERROR_METRIC = "headwatch_head_eviction_error_ratio"
SINK_METRIC = "headwatch_model_sink_tokens"
RECENT_METRIC = "headwatch_model_recent_tokens"
_WANTED = frozenset({SAFE_METRIC, ERROR_METRIC, SINK_METRIC, RECENT_METRIC})


@dataclass(frozen=True)
class ModelVerdicts:
    """One model's verdicts in an exposition; arrays are (layers, kv_heads)."""

    model_name: str
    streaming: np.ndarray  # bool: True = safe to keep only sink + recent
    error: np.ndarray  # worst eviction-error quantile of the KV head's query heads, NaN if unknown
    sink_tokens: int | None  # the exporter's headwatch_model_sink_tokens, None if absent
    recent_tokens: int | None  # the exporter's headwatch_model_recent_tokens, None if absent
    where: str

    def keep_set(self, sink_tokens: int | None, recent_tokens: int | None) -> tuple[int, int]:
        """Return (S, R): each given value wins, else the exporter's; PolicyError if neither has it."""
        sink = sink_tokens if sink_tokens is not None else self.sink_tokens
        recent = recent_tokens if recent_tokens is not None else self.recent_tokens
        if sink is None or recent is None:
            missing = [
                f"--{flag} or {metric}"
                for value, flag, metric in (
                    (sink, "sink-tokens", SINK_METRIC),
                    (recent, "recent-tokens", RECENT_METRIC),
                )
                if value is None
            ]
            raise PolicyError(
                f"expected {' and '.join(missing)} for model {self.model_name!r} at {self.where}, "
                f"got neither (an exporter older than these gauges: pass the collector's values)"
            )
        return sink, recent


def _setting(values: dict[str, float], model_name: str, metric: str, where: str) -> int | None:
    value = values.get(model_name)
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise PolicyError(
            f"expected {metric} of {model_name!r} at {where} to be a whole number >= 0, got {value}"
        )
    return int(value)


def read_verdicts(text: str, model_name: str | None, where: str) -> ModelVerdicts:
    """Return one model's verdicts, errors, S and R from Prometheus text exposition.

    `model_name` may be None when the exposition holds one model only.
    """
    from prometheus_client.parser import text_string_to_metric_families

    safe: dict[tuple[str, int, int], float] = {}
    errors: dict[tuple[str, int, int], float] = {}
    settings: dict[str, dict[str, float]] = {SINK_METRIC: {}, RECENT_METRIC: {}}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in _WANTED:
                    continue
                lab = sample.labels
                if sample.name in settings:
                    settings[sample.name][lab.get("model_name", "")] = sample.value
                    continue
                key = (lab.get("model_name", ""), int(lab["layer"]), int(lab["kv_head"]))
                if sample.name == SAFE_METRIC:
                    safe[key] = sample.value
                else:
                    errors[key] = max(errors.get(key, -math.inf), sample.value)
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyError(f"expected Prometheus text exposition from {where}, got {exc!r}") from exc
    models = sorted({k[0] for k in safe})
    if not models:
        raise PolicyError(f"expected {SAFE_METRIC} series at {where}, got none")
    if model_name is None:
        if len(models) > 1:
            raise PolicyError(f"expected one model at {where} or --model-name, got {models}")
        model_name = models[0]
    if model_name not in models:
        raise PolicyError(f"expected model_name {model_name!r} at {where}, got {models}")
    keys = [k for k in safe if k[0] == model_name]
    shape = (max(k[1] for k in keys) + 1, max(k[2] for k in keys) + 1)
    streaming = np.zeros(shape, dtype=bool)
    error = np.full(shape, np.nan)
    for key in keys:
        streaming[key[1:]] = safe[key] >= 0.5
        error[key[1:]] = errors.get(key, np.nan)
    return ModelVerdicts(
        model_name=model_name,
        streaming=streaming,
        error=error,
        sink_tokens=_setting(settings[SINK_METRIC], model_name, SINK_METRIC, where),
        recent_tokens=_setting(settings[RECENT_METRIC], model_name, RECENT_METRIC, where),
        where=where,
    )


def fetch_metrics(url: str, timeout_seconds: float = 10.0) -> str:
    """Return the body of an exporter's /metrics endpoint."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
            return str(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PolicyError(f"expected an exporter /metrics endpoint at {url}, got {exc}") from exc
