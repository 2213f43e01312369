"""Generated Prometheus rules: promtool accepts them, every alert is unit-tested, bad config fails.

`promtool` comes from the Debian `prometheus` package; the promtool tests skip (with that reason)
only where it is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.alerts import alert_rules
from dashboards.config import GenerateConfig, parse_config
from dashboards.errors import ConfigError
from dashboards.rulefiles import ALERTS_FILE, RECORDING_FILE, render_rule_files

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "dashboards" / "generated" / "rules"
RULE_TESTS = sorted((ROOT / "dashboards" / "tests").glob("*.test.yml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_accepts_the_committed_rule_files() -> None:
    result = _promtool(
        "check", "rules", str(RULES_DIR / ALERTS_FILE), str(RULES_DIR / RECORDING_FILE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", *(str(p) for p in RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def _tested_alerts() -> set[str]:
    names: set[str] = set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            names.update(t["alertname"] for t in group.get("alert_rule_test", []))
    return names


def _firing_and_silent_tests() -> tuple[set[str], set[str]]:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for t in group.get("alert_rule_test", []):
                (firing if t["exp_alerts"] else silent).add(t["alertname"])
    return firing, silent


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    names = {rule.alert for rule in alert_rules(GenerateConfig())}
    firing, silent = _firing_and_silent_tests()
    assert names <= _tested_alerts()
    assert names <= firing, f"alerts never expected to fire: {sorted(names - firing)}"
    assert names <= silent, f"alerts never expected to stay silent: {sorted(names - silent)}"


def _committed_alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load((RULES_DIR / ALERTS_FILE).read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("rule", _committed_alerts(), ids=lambda r: r["alert"])
def test_alert_has_severity_summary_and_a_runbook_anchor_that_exists(rule: dict[str, Any]) -> None:
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbooks, re.MULTILINE)}
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert rule["annotations"]["runbook_url"].split("#")[1] in anchors
    assert rule["for"] and rule["keep_firing_for"]


def test_drift_alert_needs_several_heads_from_config() -> None:
    config = parse_config({"alerts": {"drift": {"min_heads": 5}}})
    drift = next(r for r in alert_rules(config) if r.alert == "HeadwatchPatternDrift")
    assert drift.expr.endswith("headwatch_model_heads_drifted) >= 5")


def test_safe_head_lost_is_critical_by_default() -> None:
    rule = next(
        r for r in alert_rules(GenerateConfig()) if r.alert == "HeadwatchSafeKVHeadBecameUnsafe"
    )
    assert rule.labels["severity"] == "critical"
    assert "max_over_time(headwatch_kv_head_safe_to_compress[1h])" in rule.expr


def test_disabled_alerts_are_left_out() -> None:
    config = parse_config({"alerts": {"disabled": ["HeadwatchExporterDown"]}})
    assert "HeadwatchExporterDown" not in {r.alert for r in alert_rules(config)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"alerts": {"drift": {"min_heads": 1}}}, "alerts.drift.min_heads"),
        ({"alerts": {"collector_dropping": {"ratio": 1.5}}}, "alerts.collector_dropping.ratio"),
        ({"alerts": {"exporter_lag": {"messages": 0}}}, "alerts.exporter_lag.messages"),
        ({"alerts": {"telemetry_absent": {"silence_seconds": 5}}}, "silence_seconds"),
        ({"alerts": {"drift": {"for": "ten minutes"}}}, "expected a Prometheus duration"),
        ({"alerts": {"drift": {"min_head": 3}}}, "min_head"),
        ({"dashboards": {"head_matrices": ["headwatch_head_entropy"]}}, "unknown metric"),
        ({"dashboards": {"eviction_error_warn": 0.2, "eviction_error_bad": 0.1}}, "below"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_unknown_alert_name_in_disabled_is_rejected_at_generation() -> None:
    config = parse_config({"alerts": {"disabled": ["HeadwatchNoSuchAlert"]}})
    with pytest.raises(ConfigError, match="HeadwatchNoSuchAlert"):
        render_rule_files(config)


@needs_promtool
def test_rules_generated_from_a_custom_config_pass_promtool(tmp_path: Path) -> None:
    config = parse_config(
        {"alerts": {"drift": {"min_heads": 8, "for": "30m"}, "safe_head_lost": {"lookback": "3h"}}}
    )
    paths = []
    for name, text in render_rule_files(config).items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    result = _promtool("check", "rules", *paths)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_managed_copies_cover_every_alert_with_grafana_templating() -> None:
    from dashboards.grafana_alerts import grafana_rules

    config = GenerateConfig()
    rules = grafana_rules(config)
    assert [r["title"] for r in rules] == [r.alert for r in alert_rules(config)]
    for rule in rules:
        assert len(rule["uid"]) <= 40
        assert rule["data"][0]["datasourceUid"] == config.grafana_datasource_uid
        text = " ".join(rule["annotations"].values())
        assert "$value " not in text and "$value}" not in text.replace(" ", "")
    invalid = next(r for r in rules if r["title"] == "HeadwatchInvalidMessages")
    assert "{{ humanizePercentage $values.A.Value }}" in invalid["annotations"]["summary"]
