"""Alertmanager from the Debian package, on 127.0.0.1, with a webhook receiver tests can set."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from headwatch.localstack.errors import StackConfigError
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.ports import HOST, choose_port
from headwatch.localstack.process import ProcessHandle, spawn, stop
from headwatch.localstack.prometheus import duration, reload
from headwatch.localstack.readiness import http_ok, wait_ready
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.templates import render_file

logger = logging.getLogger(__name__)

TEMPLATE = "alertmanager.yml.tmpl"


@dataclass(frozen=True)
class AlertmanagerServer:
    """A running Alertmanager this stack started."""

    process: ProcessHandle
    port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def config_values(webhook_url: str | None, group_wait_seconds: float = 1.0) -> dict[str, str]:
    """Return the values that fill deploy/local/alertmanager.yml.tmpl (no webhook: no receiver)."""
    if webhook_url is None:
        configs: list[dict[str, object]] = []
    elif webhook_url.startswith(("http://", "https://")):
        configs = [{"url": webhook_url, "send_resolved": True}]
    else:
        raise StackConfigError(f"expected an http(s):// webhook URL, got {webhook_url!r}")
    # JSON is valid YAML flow style, and quotes the URL safely.
    return {"webhook_configs": json.dumps(configs), "group_wait": duration(group_wait_seconds)}


def write_config(paths: StackPaths, config_path: Path, webhook_url: str | None) -> Path:
    """Render the Alertmanager config with `webhook_url` into `config_path`."""
    return render_file(paths.deploy_dir / TEMPLATE, config_values(webhook_url), config_path)


def set_webhook(
    paths: StackPaths, server_url: str, config_path: Path, webhook_url: str | None
) -> None:
    """Point the receiver of a running Alertmanager at `webhook_url` and reload it."""
    write_config(paths, config_path, webhook_url)
    reload(server_url)


def start_alertmanager(
    binary: Path,
    paths: StackPaths,
    run_dir: Path,
    settings: StackSettings,
    *,
    taken_ports: Collection[int] = (),
    die_with_parent: bool = False,
) -> AlertmanagerServer:
    """Render the config under `run_dir`/alertmanager, start Alertmanager and return once ready."""
    port = choose_port(
        settings.alertmanager_port,
        strict=settings.strict_ports,
        taken=taken_ports,
        setting="HEADWATCH_STACK_ALERTMANAGER_PORT",
    )
    home = run_dir / "alertmanager"
    home.mkdir(parents=True, exist_ok=True)
    config = write_config(paths, home / "alertmanager.yml", settings.alertmanager_webhook_url)
    argv = [
        str(binary), f"--config.file={config}", f"--storage.path={home / 'data'}",
        f"--web.listen-address={HOST}:{port}",
        # An empty cluster address turns off the gossip mesh (and its extra port).
        "--cluster.listen-address=",
    ]  # fmt: skip
    handle = spawn("alertmanager", argv, home / "alertmanager.log", cwd=home,
                   die_with_parent=die_with_parent)  # fmt: skip
    server = AlertmanagerServer(handle, port, config)
    try:
        wait_ready(handle, lambda: http_ok(f"{server.url}/-/ready"), settings.start_timeout_seconds)
    except BaseException:
        stop(handle, settings.stop_timeout_seconds)
        raise
    logger.info("Alertmanager at %s", server.url)
    return server
