"""End-to-end test support: rule files generated from a config, a Prometheus that loads them, and
a webhook receiver that records what Alertmanager sends.

Imported by tests/integration/test_end_to_end.py (not a pytest conftest: nothing here is collected).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dashboards.cli import main as dashboards_main
from dashboards.config import GenerateConfig, load_config
from dashboards.generate import RULES_DIR
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.process import stop
from headwatch.localstack.prometheus import PrometheusServer, start_prometheus
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.tools import find_tool
from tests.helpers import prometheus_api


def generate_rules(config: dict[str, Any], root: Path) -> tuple[GenerateConfig, Path]:
    """Run `headwatch dashboards generate --config ... --root root`; return the config and rules dir.

    The config file is JSON, which is valid YAML, so the CLI reads it as a user's file.
    """
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "headwatch-dashboards.yaml"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    status = dashboards_main(["generate", "--config", str(config_path), "--root", str(root)])
    if status != 0:
        raise AssertionError(f"expected `dashboards generate` to exit 0, got {status}")
    rules_dir = root / RULES_DIR
    if not sorted(rules_dir.glob("*.yml")):
        raise AssertionError(f"expected generated rule files under {rules_dir}, got none")
    return load_config(config_path), rules_dir


@dataclass(frozen=True)
class _RulesPaths(StackPaths):
    """The stack's paths, except that Prometheus loads the rule files of `rules_dir`."""

    rules_dir: Path = Path()

    @property
    def rules_glob(self) -> str:
        return str(self.rules_dir / "*.yml")


@contextmanager
def rules_prometheus(
    paths: StackPaths, run_dir: Path, rules_dir: Path, alertmanager_url: str
) -> Iterator[PrometheusServer]:
    """A Prometheus of this test alone (1s scrape and evaluation) loading `rules_dir`/*.yml.

    The session's Prometheus loads the committed rules, whose drift alert waits 15 minutes; this
    one loads rules generated with short `for` durations and sends alerts to `alertmanager_url`.
    """
    settings = StackSettings(prometheus_port=0, strict_ports=False, scrape_interval_seconds=1.0)
    server = start_prometheus(
        find_tool("prometheus"),
        _RulesPaths(paths.repo_root, paths.cache_dir, rules_dir),
        run_dir,
        settings,
        alertmanager_url.removeprefix("http://").removeprefix("https://").rstrip("/"),
        die_with_parent=True,
    )
    try:
        yield server
    finally:
        stop(server.process, settings.stop_timeout_seconds)


def loaded_rules(url: str) -> dict[str, dict[str, Any]]:
    """Return Prometheus's view of its loaded rules, by alert or record name."""
    groups = prometheus_api(url, "rules")["groups"]
    return {rule["name"]: rule for group in groups for rule in group["rules"]}


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every JSON body POSTed to it.

    Usage:
        with WebhookReceiver() as hook: alertmanager.set_webhook(hook.url); ...; hook.payloads()
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._payloads: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver._payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Stay quiet: Alertmanager posts every group interval."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-receiver", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def payloads(self) -> list[dict[str, Any]]:
        """Return a copy of the bodies received so far."""
        with self._lock:
            return list(self._payloads)

    def alerts(self, status: str, **labels: str) -> list[dict[str, Any]]:
        """Return the received alerts with `status` whose labels include `labels`."""
        return [
            alert
            for payload in self.payloads()
            for alert in payload.get("alerts", [])
            if alert.get("status") == status
            and all(alert.get("labels", {}).get(k) == v for k, v in labels.items())
        ]

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
