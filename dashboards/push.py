"""Upsert the headwatch folder and dashboards into a Grafana through its HTTP API (grafana-client).

Idempotent: a dashboard whose content already matches is not posted again, so pushing twice
changes nothing the second time. `--dry-run` prints the plan (and a diff) without writing.

Usage:
    changes = plan(GrafanaApi.from_url(url, credential=token), "headwatch", models)
    apply(api, "headwatch", changes)
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

from dashboards.config import GenerateConfig
from dashboards.errors import GrafanaError
from dashboards.generate import DASHBOARDS, build_dashboard

logger = logging.getLogger(__name__)

Action = Literal["create", "update", "unchanged"]
# Keys Grafana owns: they change on every save and are not part of what we generate.
_SERVER_KEYS = ("id", "version", "iteration")


@dataclass(frozen=True)
class Change:
    """What pushing one object would do: create it, update it (with a diff) or leave it."""

    kind: Literal["folder", "dashboard", "alert-rule"]
    uid: str
    title: str
    action: Action
    diff: list[str] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Return one line saying what happens to this object."""
        return f"{self.action:9} {self.kind:10} {self.uid} ({self.title})"


def folder_uid(title: str) -> str:
    """Return a stable folder UID derived from its title (Grafana UIDs: <= 40 chars, [a-zA-Z0-9-_])."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", title).strip("-").lower()[:40] or "headwatch"


def get_or_none(call: Any, *args: Any) -> dict[str, Any] | None:
    """Call a grafana-client getter; return None on 404, raise GrafanaError on anything else."""
    try:
        result: dict[str, Any] = call(*args)
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return None
        raise GrafanaError(f"Grafana refused {call.__name__}{args}: {exc}") from exc
    except GrafanaException as exc:
        raise GrafanaError(f"Grafana failed {call.__name__}{args}: {exc}") from exc
    return result


def _normalised(model: dict[str, Any]) -> str:
    clean = {k: v for k, v in model.items() if k not in _SERVER_KEYS}
    return json.dumps(clean, indent=2, sort_keys=True)


def _dashboard_change(api: GrafanaApi, model: dict[str, Any], folder: str) -> Change:
    uid, title = model["uid"], model["title"]
    payload = {
        "dashboard": {**model, "id": None},
        "folderUid": folder,
        "overwrite": True,
        "message": "headwatch dashboards push",
    }
    current = get_or_none(api.dashboard.get_dashboard, uid)
    if current is None:
        return Change("dashboard", uid, title, "create", payload=payload)
    old, new = _normalised(current.get("dashboard", {})), _normalised(model)
    diff = list(
        difflib.unified_diff(
            old.splitlines(), new.splitlines(), "grafana", "generated", lineterm=""
        )
    )
    moved = current.get("meta", {}).get("folderUid") != folder
    if moved:
        diff.insert(0, f"folder: {current.get('meta', {}).get('folderUid')} -> {folder}")
    if not diff:
        return Change("dashboard", uid, title, "unchanged")
    return Change("dashboard", uid, title, "update", diff=diff, payload=payload)


def plan(api: GrafanaApi, folder_title: str, models: list[dict[str, Any]]) -> list[Change]:
    """Return the changes pushing `models` into folder `folder_title` would make (reads only)."""
    uid = folder_uid(folder_title)
    folder = get_or_none(api.folder.get_folder, uid)
    if folder is None:
        changes = [Change("folder", uid, folder_title, "create")]
    elif folder.get("title") != folder_title:
        changes = [
            Change(
                "folder",
                uid,
                folder_title,
                "update",
                diff=[f"title: {folder.get('title')} -> {folder_title}"],
            )
        ]
    else:
        changes = [Change("folder", uid, folder_title, "unchanged")]
    return changes + [_dashboard_change(api, model, uid) for model in models]


def apply(api: GrafanaApi, changes: list[Change]) -> int:
    """Make the planned changes; return how many objects were written."""
    written = 0
    for change in changes:
        if change.action == "unchanged":
            continue
        try:
            if change.kind == "folder" and change.action == "create":
                api.folder.create_folder(change.title, uid=change.uid)
            elif change.kind == "folder":
                api.folder.update_folder(change.uid, title=change.title, overwrite=True)
            elif change.kind == "alert-rule" and change.action == "create":
                api.alertingprovisioning.create_alertrule(change.payload)
            elif change.kind == "alert-rule":
                api.alertingprovisioning.update_alertrule(change.uid, change.payload)
            else:
                api.dashboard.update_dashboard(change.payload)
        except GrafanaException as exc:
            raise GrafanaError(f"cannot {change.action} {change.kind} {change.uid}: {exc}") from exc
        logger.info("%s %s %s", change.action, change.kind, change.uid)
        written += 1
    return written


def push_from_cli(args: argparse.Namespace, config: GenerateConfig) -> int:
    """Run `headwatch dashboards push` with parsed arguments; return the exit status."""
    if not args.token:
        raise GrafanaError("push needs a Grafana token: pass --token or set GRAFANA_TOKEN")
    api = GrafanaApi.from_url(args.url, credential=args.token, timeout=args.timeout)
    models = [build_dashboard(builder, config) for builder in DASHBOARDS.values()]
    try:
        changes = plan(api, args.folder, models)
        if args.alert_rules:
            from dashboards.grafana_alerts import grafana_rules
            from dashboards.push_alerts import plan_alert_rules

            changes += plan_alert_rules(api, grafana_rules(config, folder_uid(args.folder)))
    except OSError as exc:  # connection refused, DNS: niquests errors derive from OSError
        raise GrafanaError(f"cannot reach Grafana at {args.url}: {exc}") from exc
    for change in changes:
        print(change.describe())
        if args.dry_run:
            for line in change.diff[:60]:
                print(f"    {line}")
            if len(change.diff) > 60:
                print(f"    ... {len(change.diff) - 60} more diff lines")
    if args.dry_run:
        pending = sum(c.action != "unchanged" for c in changes)
        print(f"dry run: {pending} change(s) not applied")
        return 0
    written = apply(api, changes)
    print(f"{written} object(s) written, {len(changes) - written} unchanged")
    return 0
