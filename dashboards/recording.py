"""Recording rules that keep dashboard queries cheap: per-model rates and a numeric pattern code."""

from __future__ import annotations

from dataclasses import dataclass

from dashboards.catalogue import PATTERNS

# Numeric code of each pattern (1-based, in catalogue order) so a matrix or state timeline can
# colour heads with value mappings; dashboards map the codes back to names.
PATTERN_CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(PATTERNS)}

HEAD_PATTERN_CODE = "model_name_layer_head:headwatch_head_pattern:code"
MESSAGES_RATE = "model_name:headwatch_model_messages:rate5m"
CONTEXT_BUCKET_RATE = "model_name_le:headwatch_model_context_tokens_bucket:rate5m"
SAFE_RATIO = "model_name:headwatch_model_kv_heads_safe:ratio"
COLLECTOR_DROPPED_RATE = "model_name_reason:headwatch_collector_dropped:rate5m"


@dataclass(frozen=True)
class RecordingRule:
    """One Prometheus recording rule."""

    record: str
    expr: str


def _pattern_code_expr() -> str:
    arms = [
        f'(headwatch_head_pattern{{pattern="{name}"}} == 1) * {code}'
        for name, code in PATTERN_CODES.items()
    ]
    return "max without (pattern) (\n  " + "\n  or ".join(arms) + "\n)"


def recording_rules() -> tuple[RecordingRule, ...]:
    """Return every recording rule, in the order they appear in headwatch-recording.yml."""
    return (
        RecordingRule(HEAD_PATTERN_CODE, _pattern_code_expr()),
        RecordingRule(
            MESSAGES_RATE,
            "sum by (model_name) (rate(headwatch_model_messages_total[5m]))",
        ),
        RecordingRule(
            CONTEXT_BUCKET_RATE,
            "sum by (model_name, le) (rate(headwatch_model_context_tokens_bucket[5m]))",
        ),
        RecordingRule(
            SAFE_RATIO,
            "max by (model_name) (headwatch_model_kv_heads_safe)\n"
            "/ max by (model_name) (headwatch_model_kv_heads > 0)",
        ),
        RecordingRule(
            COLLECTOR_DROPPED_RATE,
            "sum by (model_name, reason) (rate(headwatch_collector_dropped_total[5m]))",
        ),
    )


def recorded_names() -> frozenset[str]:
    """Return the series names the recording rules create."""
    return frozenset(rule.record for rule in recording_rules())
