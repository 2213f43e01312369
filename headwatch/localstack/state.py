"""The state file of `headwatch stack up`: which processes it started and where they listen."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from headwatch.localstack.errors import StateFileError

# Environment variables through which the test suite reuses a running stack.
ENV_KAFKA_BOOTSTRAP = "HEADWATCH_TEST_KAFKA_BOOTSTRAP"
ENV_PROMETHEUS_URL = "HEADWATCH_TEST_PROMETHEUS_URL"
ENV_PROMETHEUS_TARGETS_DIR = "HEADWATCH_TEST_PROMETHEUS_TARGETS_DIR"
ENV_ALERTMANAGER_URL = "HEADWATCH_TEST_ALERTMANAGER_URL"
ENV_ALERTMANAGER_CONFIG = "HEADWATCH_TEST_ALERTMANAGER_CONFIG"


class ServiceState(BaseModel):
    """One process `up` started: enough to find it again and to stop only it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    pid: int
    start_ticks: int
    log_path: str
    address: str


class StackState(BaseModel):
    """Everything `up` started, written to .cache/stack/state.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str
    kafka_version: str | None = None
    kafka_bootstrap: str | None = None
    prometheus_url: str | None = None
    prometheus_targets_dir: str | None = None
    alertmanager_url: str | None = None
    alertmanager_config: str | None = None
    services: tuple[ServiceState, ...] = ()


def dump_state(state: StackState, path: Path) -> None:
    """Write `state` to `path` atomically (write, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(state.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def load_state(path: Path) -> StackState | None:
    """Return the state in `path`, None when there is no file, StateFileError when it is corrupt."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return StackState.model_validate_json(text)
    except ValidationError as exc:
        raise StateFileError(
            f"expected a state written by `headwatch stack up` in {path}, got: "
            f"{exc.errors()[0]['msg']}; remove the file if no stack is running"
        ) from exc


def reuse_environment(state: StackState) -> dict[str, str]:
    """Return the HEADWATCH_TEST_* variables that make the test suite reuse this stack."""
    pairs = {
        ENV_KAFKA_BOOTSTRAP: state.kafka_bootstrap,
        ENV_PROMETHEUS_URL: state.prometheus_url,
        ENV_PROMETHEUS_TARGETS_DIR: state.prometheus_targets_dir,
        ENV_ALERTMANAGER_URL: state.alertmanager_url,
        ENV_ALERTMANAGER_CONFIG: state.alertmanager_config,
    }
    return {name: value for name, value in pairs.items() if value is not None}
