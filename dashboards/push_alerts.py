"""Plan and apply Grafana-managed alert rules through the provisioning API (optional push step).

Usage:
    changes = plan_alert_rules(api, grafana_rules(config))
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from grafana_client import GrafanaApi

from dashboards.push import Action, Change, get_or_none

# Fields Grafana adds or owns on a stored rule; not part of what we generate.
_SERVER_KEYS = (
    "id",
    "orgID",
    "updated",
    "provenance",
    "isPaused",
    "notification_settings",
    "record",
)


def _normalised(rule: dict[str, Any]) -> str:
    clean = {k: v for k, v in rule.items() if k not in _SERVER_KEYS and v not in (None, {}, [])}
    return json.dumps(clean, indent=2, sort_keys=True)


def plan_alert_rules(api: GrafanaApi, rules: list[dict[str, Any]]) -> list[Change]:
    """Return create/update/unchanged for each rule, compared with what Grafana stores (reads only)."""
    changes = []
    for rule in rules:
        uid, title = rule["uid"], rule["title"]
        current = get_or_none(api.alertingprovisioning.get_alertrule, uid)
        if current is None:
            changes.append(Change("alert-rule", uid, title, "create", payload=rule))
            continue
        diff = list(
            difflib.unified_diff(
                _normalised(current).splitlines(), _normalised(rule).splitlines(),
                "grafana", "generated", lineterm="",
            )
        )  # fmt: skip
        action: Action = "update" if diff else "unchanged"
        changes.append(Change("alert-rule", uid, title, action, diff=diff, payload=rule))
    return changes
