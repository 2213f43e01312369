"""Prometheus from the Debian package, on 127.0.0.1, with file-based scrape targets."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from headwatch.localstack.errors import StackConfigError
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.ports import HOST, choose_port
from headwatch.localstack.process import ProcessHandle, spawn, stop
from headwatch.localstack.readiness import http_ok, http_post, wait_ready
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.templates import render_file, yaml_string

logger = logging.getLogger(__name__)

_JOB_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.-]*$")
_ADDRESS = re.compile(r"^[a-zA-Z0-9.-]+:[0-9]{1,5}$")


@dataclass(frozen=True)
class PrometheusServer:
    """A running Prometheus this stack started."""

    process: ProcessHandle
    port: int
    config_path: Path
    targets_dir: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def duration(seconds: float) -> str:
    """Return a Prometheus duration for `seconds` (1.0 -> "1s", 0.5 -> "500ms")."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise StackConfigError(f"expected a positive duration, got {seconds}s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def config_values(
    *, port: int, alertmanager_address: str, rules_glob: str, targets_dir: Path,
    scrape_interval_seconds: float,
) -> dict[str, str]:  # fmt: skip
    """Return the values that fill deploy/local/prometheus.yml.tmpl."""
    return {
        "scrape_interval": duration(scrape_interval_seconds),
        "rules_glob": yaml_string(rules_glob),
        "alertmanager_address": yaml_string(alertmanager_address),
        "prometheus_address": yaml_string(f"{HOST}:{port}"),
        "targets_glob": yaml_string(str(targets_dir / "*.json")),
    }


def file_sd_document(job: str, address: str) -> str:
    """Return the file_sd JSON that makes Prometheus scrape `address` under job `job`."""
    if not _JOB_NAME.match(job):
        raise StackConfigError(f"expected a job name like [a-zA-Z_][a-zA-Z0-9_.-]*, got {job!r}")
    if not _ADDRESS.match(address):
        raise StackConfigError(f"expected a scrape address host:port, got {address!r}")
    # A target's own "job" label overrides the scrape config's job_name.
    return json.dumps([{"targets": [address], "labels": {"job": job}}], indent=2)


def write_scrape_target(targets_dir: Path, job: str, address: str) -> Path:
    """Add (or replace) the scrape target of `job`; Prometheus picks it up within a second."""
    document = file_sd_document(job, address)
    targets_dir.mkdir(parents=True, exist_ok=True)
    target = targets_dir / f"{job}.json"
    # Write then rename, so Prometheus never reads half a file.
    partial = targets_dir / f".{job}.json.partial"
    partial.write_text(document, encoding="utf-8")
    os.replace(partial, target)
    return target


def remove_scrape_target(targets_dir: Path, job: str) -> None:
    """Remove the scrape target of `job`, if there is one."""
    (targets_dir / f"{job}.json").unlink(missing_ok=True)


def reload(url: str) -> None:
    """Ask the Prometheus or Alertmanager at `url` to re-read its configuration."""
    http_post(f"{url.rstrip('/')}/-/reload")


def start_prometheus(
    binary: Path,
    paths: StackPaths,
    run_dir: Path,
    settings: StackSettings,
    alertmanager_address: str,
    *,
    taken_ports: Collection[int] = (),
    die_with_parent: bool = False,
) -> PrometheusServer:
    """Render the config under `run_dir`/prometheus, start Prometheus and return once ready."""
    port = choose_port(
        settings.prometheus_port,
        strict=settings.strict_ports,
        taken=taken_ports,
        setting="HEADWATCH_STACK_PROMETHEUS_PORT",
    )
    home = run_dir / "prometheus"
    targets_dir = home / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)
    config = render_file(
        paths.deploy_dir / "prometheus.yml.tmpl",
        config_values(port=port, alertmanager_address=alertmanager_address,
                      rules_glob=paths.rules_glob, targets_dir=targets_dir,
                      scrape_interval_seconds=settings.scrape_interval_seconds),
        home / "prometheus.yml",
    )  # fmt: skip
    argv = [
        str(binary), f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address={HOST}:{port}", "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=1d", "--log.level=info",
    ]  # fmt: skip
    handle = spawn("prometheus", argv, home / "prometheus.log", cwd=home,
                   die_with_parent=die_with_parent)  # fmt: skip
    server = PrometheusServer(handle, port, config, targets_dir)
    try:
        wait_ready(handle, lambda: http_ok(f"{server.url}/-/ready"), settings.start_timeout_seconds)
    except BaseException:
        stop(handle, settings.stop_timeout_seconds)
        raise
    logger.info("Prometheus at %s", server.url)
    return server
