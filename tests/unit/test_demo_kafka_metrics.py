"""`headwatch demo --kafka`: the collector's endpoint counts what the Kafka sink published.

The broker is replaced by a sink that acknowledges every message at once; the collector's settings
come from HEADWATCH_COLLECTOR_* as in the compose demo.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import collector
import headwatch.localstack.kafka
from headwatch.demo import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _AckingSink:
    """Stands in for KafkaSink: counts every message as acknowledged at once.

    At close, the last moment Prometheus could scrape the demo's process, it keeps what the
    collector's endpoint serves.
    """

    endpoint = ""
    scraped: str | None = None

    def __init__(self, settings: Any, metrics: Any) -> None:
        self.settings = settings
        self.metrics = metrics
        self.closed = False

    def publish(self, message: Any) -> None:
        self.metrics.published.labels(model_name=message.header.model_name).inc()

    def close(self, timeout_seconds: float | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with urllib.request.urlopen(_AckingSink.endpoint, timeout=10) as r:
                _AckingSink.scraped = r.read().decode()
        except urllib.error.URLError as exc:
            _AckingSink.scraped = f"no endpoint: {exc}"


def test_collector_endpoint_shows_published_messages_under_the_configured_name(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = _free_port()
    monkeypatch.setenv("HEADWATCH_COLLECTOR_METRICS_PORT", str(port))
    monkeypatch.setenv("HEADWATCH_COLLECTOR_MODEL_NAME", "headwatch-demo")
    monkeypatch.setattr(headwatch.localstack.kafka, "broker_answers", lambda server: True)
    monkeypatch.setattr(collector, "KafkaSink", _AckingSink)
    monkeypatch.setattr(_AckingSink, "endpoint", f"http://127.0.0.1:{port}/metrics")
    monkeypatch.setattr(_AckingSink, "scraped", None)
    argv = ["--kafka", "127.0.0.1:9", "--model", str(model_dir), "--requests", "2",
            "--context-tokens", "128", "--out", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 0
    assert "published 2 of 2 messages" in capsys.readouterr().out
    scraped = _AckingSink.scraped or ""
    assert 'headwatch_collector_published_total{model_name="headwatch-demo"} 2.0' in scraped
    assert 'headwatch_collector_sampled_total{model_name="headwatch-demo"} 2.0' in scraped
