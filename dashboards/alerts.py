"""Alert rules built from AlertsConfig: drift on several heads, safe heads lost, pipeline faults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dashboards.config import AlertTiming, GenerateConfig
from dashboards.errors import ConfigError


@dataclass(frozen=True)
class AlertRule:
    """One Prometheus alerting rule."""

    alert: str
    expr: str
    for_: str
    keep_firing_for: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def _rule(
    config: GenerateConfig, name: str, expr: str, timing: AlertTiming, summary: str, text: str
) -> AlertRule:
    return AlertRule(
        alert=name,
        expr=expr,
        for_=timing.for_,
        keep_firing_for=timing.keep_firing_for,
        labels={"severity": timing.severity, "team": "headwatch"},
        annotations={
            "summary": summary,
            "description": text,
            "runbook_url": f"{config.runbook_base_url}#{name.lower()}",
        },
    )


def _model_rules(config: GenerateConfig) -> list[AlertRule]:
    a = config.alerts
    silence, lookback = a.telemetry_absent.silence_seconds, a.telemetry_absent.lookback
    last_seen = "max by (model_name) (headwatch_model_last_message_timestamp_seconds)"
    return [
        _rule(
            config,
            "HeadwatchPatternDrift",
            f"max by (model_name) (headwatch_model_heads_drifted) >= {a.drift.min_heads}",
            a.drift,
            "{{ $value }} attention heads of {{ $labels.model_name }} drifted from their reference",
            "At least " + str(a.drift.min_heads) + " query heads of {{ $labels.model_name }} "
            "failed their drift test for several consecutive windows. The traffic or the model "
            "changed; compression verdicts made on the old behaviour may no longer hold.",
        ),
        _rule(
            config,
            "HeadwatchSafeKVHeadBecameUnsafe",
            "max by (model_name, layer, kv_head) (headwatch_kv_head_safe_to_compress) == 0\n"
            "and on (model_name, layer, kv_head)\n"
            "min by (model_name, layer, kv_head) (headwatch_kv_head_verdict_ready) == 1\n"
            "and on (model_name, layer, kv_head)\n"
            "max by (model_name, layer, kv_head) "
            f"(max_over_time(headwatch_kv_head_safe_to_compress[{a.safe_head_lost.lookback}])) == 1",
            a.safe_head_lost,
            "KV head {{ $labels.layer }}/{{ $labels.kv_head }} of {{ $labels.model_name }} "
            "is no longer safe to compress",
            "KV head " + "{{ $labels.kv_head }} in layer {{ $labels.layer }} of "
            "{{ $labels.model_name }} was safe to keep only sink+recent tokens within the last "
            f"{a.safe_head_lost.lookback} and is not any more. Anyone compressing it now loses "
            "output quality: stop compressing this head.",
        ),
        _rule(
            config,
            "HeadwatchTelemetryAbsent",
            f"(time() - {last_seen}) > {silence} < {_seconds(lookback)}\n"
            f"or\n(max by (model_name) "
            f"(max_over_time(headwatch_model_last_message_timestamp_seconds[{lookback}]))\n"
            f" unless {last_seen})",
            a.telemetry_absent,
            "{{ $labels.model_name }} stopped sending head statistics",
            "{{ $labels.model_name }} " + f"reported within the last {lookback} but has sent no "
            f"head statistics for more than {silence}s (or its series vanished). Dashboards show "
            "its last window; verdicts are not being refreshed.",
        ),
    ]


def _pipeline_rules(config: GenerateConfig) -> list[AlertRule]:
    a = config.alerts
    drop_w, inv_w = a.collector_dropping.window, a.invalid_messages.window
    blind_w = a.collector_blind.window
    dropped = f"sum by (model_name) (rate(headwatch_collector_dropped_total[{drop_w}]))"
    published = f"sum by (model_name) (rate(headwatch_collector_published_total[{drop_w}]))"
    return [
        _rule(
            config,
            "HeadwatchCollectorDropping",
            f"{dropped}\n/ (({published} or {dropped} * 0) + {dropped})\n"
            f"> {a.collector_dropping.ratio}",
            a.collector_dropping,
            "Collector of {{ $labels.model_name }} drops {{ $value | humanizePercentage }} "
            "of its messages",
            "The collector inside the serving process of {{ $labels.model_name }} drops more "
            f"than {a.collector_dropping.ratio:.0%} of its head-statistics messages "
            "(full queue or unreachable broker). Windows fill slowly and verdicts lag.",
        ),
        _rule(
            config,
            "HeadwatchCollectorHookDisabled",
            "headwatch_collector_hook_enabled == 0",
            a.hook_disabled,
            "Attention hook disabled itself in {{ $labels.instance }} ({{ $labels.model_name }})",
            "The collector's attention hook failed repeatedly and turned itself off; the model "
            "still serves, but no statistics are measured on this replica.",
        ),
        _rule(
            config,
            "HeadwatchCollectorMeasuresNothing",
            # Passes run compiled are not counted there: generate() compiles only decode steps,
            # and a quiet replica at a low sample rate may rightly measure no prefill for a while.
            "sum by (instance, model_name) (rate(headwatch_collector_unmeasured_passes_total"
            f"[{blind_w}])) > 0\n"
            "unless on (instance, model_name)\n"
            f"sum by (instance, model_name) (rate(headwatch_collector_sampled_total[{blind_w}])) > 0",
            a.collector_blind,
            "Collector in {{ $labels.instance }} measures nothing of {{ $labels.model_name }}",
            "The collector's hook is on, met passes it cannot measure (continuous batching, or "
            "an attention implementation set after attach) and measured none: the model serves "
            "unchanged, but this replica sends no statistics. Its log names the reason.",
        ),
        _rule(
            config,
            "HeadwatchExporterLagging",
            "max by (topic, partition) (headwatch_exporter_consumer_lag_messages) "
            f"> {a.exporter_lag.messages}",
            a.exporter_lag,
            "Exporter is {{ $value }} messages behind on {{ $labels.topic }}[{{ $labels.partition }}]",
            "The exporter replica owning this partition consumes slower than collectors publish; "
            "its windows and verdicts describe the past.",
        ),
        _rule(
            config,
            "HeadwatchInvalidMessages",
            f"sum by (reason) (rate(headwatch_exporter_invalid_messages_total[{inv_w}]))\n"
            f"/ on () group_left ()\nsum (rate(headwatch_exporter_messages_total[{inv_w}]))\n"
            f"> {a.invalid_messages.ratio}",
            a.invalid_messages,
            "{{ $value | humanizePercentage }} of head-statistics messages are invalid "
            "({{ $labels.reason }})",
            "The exporter rejects messages with reason {{ $labels.reason }} and sends them to "
            "the dead-letter topic. A collector with another schema version or a bug is "
            "publishing.",
        ),
        _rule(
            config,
            "HeadwatchExporterDown",
            f'up{{job="{config.exporter_job}"}} == 0',
            a.exporter_down,
            "Exporter target {{ $labels.instance }} is down",
            "Prometheus cannot scrape a headwatch exporter replica; its partitions' models have "
            "no fresh head metrics until the consumer group rebalances.",
        ),
    ]


def alert_rules(config: GenerateConfig) -> tuple[AlertRule, ...]:
    """Return every enabled alert rule; unknown names in `alerts.disabled` are an error."""
    rules = [*_model_rules(config), *_pipeline_rules(config)]
    names = {rule.alert for rule in rules}
    unknown = sorted(set(config.alerts.disabled) - names)
    if unknown:
        raise ConfigError(
            f"alerts.disabled: expected alert names among {sorted(names)}, got {unknown}"
        )
    return tuple(rule for rule in rules if rule.alert not in config.alerts.disabled)


_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def _seconds(duration: str) -> int:
    """Return a Prometheus duration (already validated) in whole seconds."""
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|[smhdwy])", duration):
        total += int(number) * _UNIT_SECONDS[unit]
    return int(total)
