"""Settings: environment names, nesting, validation, and the policy they build."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from exporter.settings import ExporterSettings


def test_defaults_match_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    s = ExporterSettings()
    assert (s.kafka.bootstrap_servers, s.http.host, s.http.port) == (
        "127.0.0.1:9092",
        "127.0.0.1",
        9464,
    )
    assert s.kafka.dead_letter_topic == "headwatch.head-stats.v1.dlq"


def test_nested_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWATCH_EXPORTER_KAFKA__BOOTSTRAP_SERVERS", "broker:19092")
    monkeypatch.setenv("HEADWATCH_EXPORTER_HTTP__PORT", "9999")
    monkeypatch.setenv("HEADWATCH_EXPORTER_PATTERNS__SINK_MIN_MASS", "0.9")
    monkeypatch.setenv("HEADWATCH_EXPORTER_VERDICTS__ENTER_BOUND", "0.02")
    s = ExporterSettings()
    policy = s.aggregate_policy()
    assert s.kafka.bootstrap_servers == "broker:19092" and s.http.port == 9999
    assert policy.patterns.sink_min_mass == 0.9 and policy.verdicts.enter_bound == 0.02


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWATCH_EXPORTER_DRIFT__ALPHA", "1.5")
    with pytest.raises(ValidationError, match="alpha"):
        ExporterSettings()


def test_settings_are_frozen() -> None:
    s = ExporterSettings()
    with pytest.raises(ValidationError):
        s.log_level = "DEBUG"  # type: ignore[misc]


def test_exporter_imports_no_torch() -> None:
    code = "import sys, exporter, exporter.cli, exporter.consume, exporter.metrics, exporter.http; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bad_settings_exit_2() -> None:
    env = {"HEADWATCH_EXPORTER_HTTP__PORT": "not-a-port", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "settings"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and "HTTP__PORT" not in done.stdout


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"VERDICTS__ENTER_BOUND": "0.09"}, "VERDICTS__ENTER_BOUND <= VERDICTS__EXIT_BOUND"),
        ({"VERDICTS__MIN_SAMPLES": "600"}, "VERDICTS__MIN_SAMPLES <= WINDOW__SAMPLES"),
        ({"DRIFT__MIN_HEAD_SAMPLES": "300"}, "DRIFT__MIN_HEAD_SAMPLES <= DRIFT__WINDOW_SAMPLES"),
        ({"LOG_LEVEL": "verbose"}, "log_level"),
    ],
    ids=["hysteresis", "verdict-samples", "drift-samples", "log-level"],
)
def test_settings_that_could_never_work_are_refused_naming_them(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"HEADWATCH_EXPORTER_{name}", value)
    with pytest.raises(ValidationError, match=names):
        ExporterSettings()


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWATCH_EXPORTER_LOG_LEVEL", "debug")
    assert ExporterSettings().log_level == "DEBUG"


def test_inconsistent_settings_exit_2_before_reaching_the_broker() -> None:
    env = {"HEADWATCH_EXPORTER_VERDICTS__ENTER_BOUND": "0.09", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "serve"], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ENTER_BOUND" in done.stderr and "Traceback" not in done.stderr
