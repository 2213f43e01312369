"""Test helpers: the one waiting primitive, and thin clients for Prometheus and Alertmanager."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from headwatch.localstack.alertmanager import set_webhook
from headwatch.localstack.paths import StackPaths
from headwatch.localstack.prometheus import reload, remove_scrape_target, write_scrape_target

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """`wait_until` ran out of time; the message says what was awaited and the last value seen."""


def wait_until(
    predicate: Callable[[], T],
    timeout_seconds: float,
    interval_seconds: float = 0.05,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns a truthy value and return that value.

    Exceptions of the types in `ignore` count as "not yet". Raises WaitTimeout after
    `timeout_seconds`, naming `message` and the last value or exception.

    Usage:
        records = wait_until(lambda: consumer.poll(100), 30, message="first records")
    """
    deadline = time.monotonic() + timeout_seconds
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"timed out after {timeout_seconds}s waiting for {message or predicate!r}; "
                f"last result: {last!r}"
            )
        time.sleep(interval_seconds)


def open_sockets() -> int:
    """Sockets (and socket pairs) this process holds open (Linux: /proc/self/fd)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:  # closed while listing (the listing's own descriptor)
            continue
    return count


def unique_name(prefix: str, hint: str = "") -> str:
    """Return a name unique to this call, safe as a Kafka topic, group or Prometheus job name."""
    cleaned = re.sub(r"[^a-zA-Z0-9_]+", "_", hint).strip("_")[:60]
    return (
        f"{prefix}_{cleaned}_{uuid.uuid4().hex[:10]}"
        if cleaned
        else f"{prefix}_{uuid.uuid4().hex[:10]}"
    )


def http_json(url: str, data: bytes | None = None, timeout_seconds: float = 10.0) -> Any:
    """Return the decoded JSON body of GET `url` (POST when `data` is given)."""
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
        body = response.read()
    return json.loads(body) if body else None


def prometheus_api(url: str, path: str, params: Mapping[str, str] | None = None) -> Any:
    """Return the `data` of a Prometheus HTTP API call, failing on a non-success status."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    answer = http_json(f"{url.rstrip('/')}/api/v1/{path}{query}")
    if answer.get("status") != "success":
        raise AssertionError(f"expected status success from {path}, got {answer!r}")
    return answer["data"]


def prometheus_query(url: str, promql: str) -> list[dict[str, Any]]:
    """Return the instant-vector result of `promql` (each item has `metric` and `value`)."""
    data = prometheus_api(url, "query", {"query": promql})
    if data["resultType"] != "vector":
        raise AssertionError(f"expected a vector from {promql!r}, got {data['resultType']}")
    result: list[dict[str, Any]] = data["result"]
    return result


def query_values(url: str, promql: str) -> list[float]:
    """Return the sample values of `promql`'s instant vector."""
    return [float(item["value"][1]) for item in prometheus_query(url, promql)]


@dataclass(frozen=True)
class PrometheusService:
    """A real Prometheus the tests can add scrape targets to and query."""

    url: str
    targets_dir: Path | None

    def add_scrape_target(self, job: str, address: str, timeout_seconds: float = 30.0) -> None:
        """Make Prometheus scrape `address` as job `job` and wait until it reports it up."""
        if self.targets_dir is None:
            raise AssertionError(
                "this Prometheus was given by HEADWATCH_TEST_PROMETHEUS_URL without "
                "HEADWATCH_TEST_PROMETHEUS_TARGETS_DIR, so targets cannot be added"
            )
        write_scrape_target(self.targets_dir, job, address)
        wait_until(
            lambda: self.target_health(job) == "up",
            timeout_seconds,
            message=f"Prometheus to report job {job} at {address} up",
        )

    def remove_scrape_target(self, job: str) -> None:
        if self.targets_dir is not None:
            remove_scrape_target(self.targets_dir, job)

    def target_health(self, job: str) -> str | None:
        """Return the health ("up", "down", "unknown") of job `job`'s target, None if absent."""
        targets = prometheus_api(self.url, "targets", {"state": "active"})["activeTargets"]
        for target in targets:
            if target["labels"].get("job") == job:
                health: str = target["health"]
                return health
        return None

    def query(self, promql: str) -> list[dict[str, Any]]:
        return prometheus_query(self.url, promql)

    def reload(self) -> None:
        """Make Prometheus re-read its config and rule files."""
        reload(self.url)


@dataclass(frozen=True)
class AlertmanagerService:
    """A real Alertmanager whose webhook receiver tests can point at their own HTTP server."""

    url: str
    config_path: Path | None
    paths: StackPaths

    def set_webhook(self, webhook_url: str | None) -> None:
        """Send every notification to `webhook_url` (None: to no receiver) and reload."""
        if self.config_path is None:
            raise AssertionError(
                "this Alertmanager was given by HEADWATCH_TEST_ALERTMANAGER_URL without "
                "HEADWATCH_TEST_ALERTMANAGER_CONFIG, so its webhook cannot be set"
            )
        set_webhook(self.paths, self.url, self.config_path, webhook_url)

    def post_alert(self, labels: Mapping[str, str]) -> None:
        """Fire an alert with `labels` through Alertmanager's v2 API."""
        http_json(f"{self.url}/api/v2/alerts", json.dumps([{"labels": dict(labels)}]).encode())
