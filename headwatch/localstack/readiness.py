"""Waiting for a service to be ready, failing fast with its log tail when it dies or hangs."""

from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from headwatch.localstack.errors import ServiceStartError
from headwatch.localstack.process import ProcessHandle, exit_status, is_running, log_tail

logger = logging.getLogger(__name__)


def wait_ready(
    handle: ProcessHandle,
    is_ready: Callable[[], bool],
    timeout_seconds: float,
    interval_seconds: float = 0.1,
) -> float:
    """Poll `is_ready` until true and return the seconds it took.

    Raises ServiceStartError with the last lines of the service's log when the process exits
    first or `timeout_seconds` pass.
    """
    started = time.monotonic()
    while True:
        if is_ready():
            took = time.monotonic() - started
            logger.info("%s ready after %.1fs", handle.name, took)
            return took
        if not is_running(handle):
            status = exit_status(handle)
            raise ServiceStartError(
                f"{handle.name} (pid {handle.pid}) exited"
                + (f" with status {status}" if status is not None else "")
                + f" before it was ready; last lines of {handle.log_path}:\n{log_tail(handle.log_path)}"
            )
        if time.monotonic() - started > timeout_seconds:
            raise ServiceStartError(
                f"{handle.name} (pid {handle.pid}) not ready after {timeout_seconds:.0f}s; "
                f"last lines of {handle.log_path}:\n{log_tail(handle.log_path)}"
            )
        time.sleep(interval_seconds)


def port_accepts(host: str, port: int, timeout_seconds: float = 0.5) -> bool:
    """Return whether a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_seconds: float = 1.0) -> bool:
    """Return whether GET `url` answers 200 (Prometheus and Alertmanager `/-/ready`)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_post(url: str, timeout_seconds: float = 10.0) -> None:
    """POST an empty body to `url` (Prometheus and Alertmanager `/-/reload`)."""
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
        response.read()
