"""`headwatch dashboards push` against a replayed Grafana HTTP API.

No Grafana server can run on these machines, so a tiny http.server on 127.0.0.1 answers the
endpoints grafana-client calls with response bodies shaped like Grafana 11's HTTP API (folder and
dashboard JSON as documented at grafana.com/docs/grafana/latest/developers/http_api/), keeps what
was posted, and records every request. The assertions are on the real HTTP traffic grafana-client
produces: methods, paths, the bearer token and the JSON bodies.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dashboards import cli

TOKEN = "glsa_test_token"


@dataclass
class ReplayedGrafana:
    """In-memory state of the replayed Grafana and the requests it received."""

    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    alert_rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, str, Any]] = field(default_factory=list)

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _, _ in self.requests if m != "GET"]


def _handler(state: ReplayedGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            state.requests.append(
                (self.command, self.path, self.headers.get("Authorization", ""), body)
            )
            return body

        def do_GET(self) -> None:
            self._record()
            if self.path.startswith("/api/folders/"):
                folder = state.folders.get(self.path.rsplit("/", 1)[1])
                if folder is None:
                    return self._reply(404, {"message": "folder not found", "status": "not-found"})
                return self._reply(200, folder)
            if self.path.startswith("/api/dashboards/uid/"):
                saved = state.dashboards.get(self.path.rsplit("/", 1)[1])
                if saved is None:
                    return self._reply(404, {"message": "Dashboard not found"})
                return self._reply(200, saved)
            if self.path.startswith("/api/v1/provisioning/alert-rules/"):
                rule = state.alert_rules.get(self.path.rsplit("/", 1)[1])
                if rule is None:
                    return self._reply(404, {"message": "rule not found"})
                return self._reply(200, rule)
            return self._reply(404, {"message": "Not found"})

        def _store_rule(self, body: dict[str, Any]) -> dict[str, Any]:
            # Grafana adds these fields to what it stores and returns
            stored = {
                **body,
                "id": 7,
                "orgID": 1,
                "updated": "2026-01-01T00:00:00Z",
                "provenance": "api",
            }
            state.alert_rules[body["uid"]] = stored
            return stored

        def do_PUT(self) -> None:
            body = self._record()
            if self.path.startswith("/api/v1/provisioning/alert-rules/"):
                return self._reply(200, self._store_rule(body))
            return self._reply(404, {"message": "Not found"})

        def do_POST(self) -> None:
            body = self._record()
            if self.path == "/api/folders":
                folder = {"id": len(state.folders) + 1, "uid": body["uid"], "title": body["title"],
                          "url": f"/dashboards/f/{body['uid']}/", "version": 1}  # fmt: skip
                state.folders[body["uid"]] = folder
                return self._reply(200, folder)
            if self.path == "/api/dashboards/db":
                model = body["dashboard"]
                previous = state.dashboards.get(model["uid"], {}).get("dashboard", {})
                version = previous.get("version", 0) + 1
                stored = {**model, "id": 40 + len(state.dashboards), "version": version}
                state.dashboards[model["uid"]] = {
                    "dashboard": stored,
                    "meta": {"folderUid": body.get("folderUid", ""), "slug": model["uid"]},
                }
                return self._reply(200, {"id": stored["id"], "uid": model["uid"], "status": "success",
                                         "version": version, "url": f"/d/{model['uid']}"})  # fmt: skip
            if self.path == "/api/v1/provisioning/alert-rules":
                return self._reply(201, self._store_rule(body))
            return self._reply(404, {"message": "Not found"})

    return Handler


@pytest.fixture(name="grafana")
def _grafana() -> Iterator[tuple[str, ReplayedGrafana]]:
    state = ReplayedGrafana()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def _push(url: str, *extra: str) -> int:
    return cli.main(["push", "--url", url, "--token", TOKEN, "--timeout", "5", *extra])


def test_push_creates_folder_and_every_dashboard_with_the_token(
    grafana: tuple[str, ReplayedGrafana],
) -> None:
    url, state = grafana
    assert _push(url) == 0
    assert state.writes() == [("POST", "/api/folders")] + [("POST", "/api/dashboards/db")] * 4
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth, _ in state.requests)
    posts = [body for method, path, _, body in state.requests if path == "/api/dashboards/db"]
    assert {b["dashboard"]["uid"] for b in posts} == {
        "headwatch-fleet", "headwatch-model-heads", "headwatch-head-detail", "headwatch-pipeline"
    }  # fmt: skip
    assert all(b["folderUid"] == "headwatch" and b["overwrite"] for b in posts)
    assert all(b["dashboard"]["id"] is None for b in posts)


def test_second_push_is_a_no_op(grafana: tuple[str, ReplayedGrafana]) -> None:
    url, state = grafana
    assert _push(url) == 0
    state.requests.clear()
    assert _push(url) == 0
    assert state.writes() == []


def test_dry_run_writes_nothing_and_prints_the_plan(
    grafana: tuple[str, ReplayedGrafana], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = grafana
    assert _push(url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert state.writes() == []
    assert "create    folder     headwatch" in out
    assert "create    dashboard  headwatch-fleet" in out
    assert "dry run: 5 change(s) not applied" in out


def test_dry_run_shows_a_diff_for_a_dashboard_edited_in_grafana(
    grafana: tuple[str, ReplayedGrafana], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = grafana
    assert _push(url) == 0
    state.dashboards["headwatch-pipeline"]["dashboard"]["title"] = "edited by hand"
    capsys.readouterr()
    assert _push(url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "update    dashboard  headwatch-pipeline" in out
    assert '-  "title": "edited by hand",' in out
    assert '+  "title": "headwatch / Pipeline health",' in out
    assert "unchanged dashboard  headwatch-fleet" in out


def test_unreachable_grafana_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _push("http://127.0.0.1:9") == 2
    assert "cannot reach Grafana at http://127.0.0.1:9" in capsys.readouterr().err


def test_missing_token_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    assert cli.main(["push", "--url", "http://127.0.0.1:9"]) == 2
    assert "needs a Grafana token" in capsys.readouterr().err


def test_alert_rules_are_created_once_then_left_alone(grafana: tuple[str, ReplayedGrafana]) -> None:
    url, state = grafana
    assert _push(url, "--alert-rules") == 0
    created = [
        body
        for method, path, _, body in state.requests
        if path == "/api/v1/provisioning/alert-rules"
    ]
    assert {r["uid"] for r in created} >= {"hw-patterndrift", "hw-safekvheadbecameunsafe"}
    assert all(r["folderUID"] == "headwatch" and r["condition"] == "C" for r in created)
    drift = next(r for r in created if r["uid"] == "hw-patterndrift")
    assert (
        drift["data"][0]["model"]["expr"]
        == "max by (model_name) (headwatch_model_heads_drifted) >= 3"
    )
    assert drift["labels"] == {"severity": "warning", "team": "headwatch"}
    state.requests.clear()
    assert _push(url, "--alert-rules") == 0
    assert state.writes() == []


def test_an_alert_rule_changed_in_grafana_is_put_back(grafana: tuple[str, ReplayedGrafana]) -> None:
    url, state = grafana
    assert _push(url, "--alert-rules") == 0
    state.alert_rules["hw-exporterdown"]["for"] = "1h"
    state.requests.clear()
    assert _push(url, "--alert-rules") == 0
    assert state.writes() == [("PUT", "/api/v1/provisioning/alert-rules/hw-exporterdown")]
