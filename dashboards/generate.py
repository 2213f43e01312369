"""Build every generated file in memory: dashboard JSON, rule files and the panel documentation.

`render_all` is pure (config in, {repo-relative path: text} out); `write` and `stale_files` are the
only functions that touch the file system.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from dashboards import fleet, head_detail, model_heads, pipeline
from dashboards.config import GenerateConfig
from dashboards.docs import render_panel_docs
from dashboards.grafana_alerts import ALERTING_FILE, render_alerting_file
from dashboards.rulefiles import render_rule_files
from dashboards.validate import check_queries

logger = logging.getLogger(__name__)
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*\w+\)$", re.DOTALL)

GRAFANA_DIR = "dashboards/generated/grafana"
RULES_DIR = "dashboards/generated/rules"
GRAFANA_ALERTING_DIR = "dashboards/generated/grafana-alerting"
PANEL_DOCS = "docs/dashboards.md"

# file stem -> builder; the stem is also the dashboard's place in docs/dashboards.md.
DASHBOARDS: dict[str, Callable[[GenerateConfig], db.Dashboard]] = {
    "fleet-overview": fleet.build,
    "model-heads": model_heads.build,
    "head-detail": head_detail.build,
    "pipeline-health": pipeline.build,
}


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every panel of a dashboard JSON model, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (where, expr) for every panel target and query variable of a dashboard."""
    found = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            found.append(
                (f"{dashboard['uid']} / {panel['title']} / {target['refId']}", target["expr"])
            )
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append(
                (f"{dashboard['uid']} / annotation {annotation['name']}", annotation["expr"])
            )
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            text = variable["query"]["query"]
            # label_values(<selector>, <label>): only the selector is PromQL
            match = _LABEL_VALUES.match(text)
            expr = match.group(1) if match else text
            found.append((f"{dashboard['uid']} / variable {variable['name']}", expr))
    return found


def build_dashboard(
    builder: Callable[[GenerateConfig], db.Dashboard], config: GenerateConfig
) -> dict[str, Any]:
    """Return one dashboard as a plain JSON model with stable panel ids."""
    model: dict[str, Any] = json.loads(json.dumps(builder(config).build(), cls=JSONEncoder))
    for panel_id, panel in enumerate(iter_panels(model), start=1):
        panel["id"] = panel_id
    return model


def render_all(config: GenerateConfig) -> dict[str, str]:
    """Return {repo-relative path: text} of every generated file; raises ConfigError on bad input."""
    files: dict[str, str] = {}
    models = {}
    for stem, builder in DASHBOARDS.items():
        model = build_dashboard(builder, config)
        check_queries(dashboard_queries(model))
        models[stem] = model
        files[f"{GRAFANA_DIR}/{stem}.json"] = json.dumps(model, indent=2, sort_keys=True) + "\n"
    for name, text in render_rule_files(config).items():
        files[f"{RULES_DIR}/{name}"] = text
    files[f"{GRAFANA_ALERTING_DIR}/{ALERTING_FILE}"] = render_alerting_file(config)
    files[PANEL_DOCS] = render_panel_docs(models)
    return files


def write(files: dict[str, str], root: Path) -> list[Path]:
    """Write the files under `root`, returning the paths whose content changed."""
    changed = []
    for relative, text in sorted(files.items()):
        path = root / relative
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        changed.append(path)
        logger.debug("wrote %s", path)
    return changed


def stale_files(files: dict[str, str], root: Path) -> list[str]:
    """Return the repo-relative paths whose committed content differs from `files` (or is missing)."""
    stale = []
    for relative, text in sorted(files.items()):
        path = root / relative
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(relative)
    for directory in (GRAFANA_DIR, RULES_DIR, GRAFANA_ALERTING_DIR):
        for path in sorted((root / directory).glob("*.*")):
            relative = path.relative_to(root).as_posix()
            if relative not in files:
                stale.append(relative)  # left over from a dashboard or rule file that is gone
    return stale
