"""HTTP adapter: /metrics (Prometheus text format) and /healthz (consumer alive, partitions, lag).

Usage:
    server = MetricsServer("127.0.0.1", 9464, registry, health)
    server.start(); ...; server.stop()
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.registry import CollectorRegistry

from exporter.exposition import CONTENT_TYPE, render

logger = logging.getLogger(__name__)

Health = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """A small threaded HTTP server for scrapes and health checks."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        registry_ref, health_ref = registry, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE, render(registry_ref.collect()))
                elif path == "/healthz":
                    ok, facts = health_ref()
                    body = json.dumps({"ok": ok, **facts}).encode()
                    self._send(200 if ok else 503, "application/json", body)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("http: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """Return the bound port (useful when asked for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
