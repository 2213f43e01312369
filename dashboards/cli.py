"""`headwatch dashboards generate|check|push`: write, verify or upload dashboards and rules.

Usage:
    headwatch dashboards generate                 # rewrite the committed generated files
    headwatch dashboards check                    # exit 1 naming each stale file (CI)
    headwatch dashboards push --url http://grafana:3000 --token $TOKEN --dry-run
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import tempfile
from pathlib import Path

from dashboards.config import load_config
from dashboards.errors import DashboardsError
from dashboards.generate import render_all, stale_files, write

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwatch dashboards", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("generate", "write dashboards/generated/ and docs/dashboards.md"),
        ("check", "fail (exit 1) when the committed generated files are stale"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", type=Path, help="YAML generation config (default: built-in)")
        cmd.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root")
    push = sub.add_parser("push", help="upsert the folder and dashboards into a Grafana")
    push.add_argument("--url", required=True, help="Grafana base URL, e.g. http://localhost:3000")
    push.add_argument(
        "--token",
        default=os.environ.get("GRAFANA_TOKEN"),
        help="service-account token (default: $GRAFANA_TOKEN)",
    )
    push.add_argument("--folder", default="headwatch", help="folder title (and UID)")
    push.add_argument(
        "--dry-run", action="store_true", help="print what would change, change nothing"
    )
    push.add_argument(
        "--alert-rules",
        action="store_true",
        help="also upsert the alerts as Grafana-managed alert rules (when Grafana notifies)",
    )
    push.add_argument("--config", type=Path, help="YAML generation config (default: built-in)")
    push.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    return parser


def _check(files: dict[str, str], root: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="headwatch-dashboards-") as tmp:
        write(files, Path(tmp))
        stale = stale_files(files, root)
        for relative in stale:
            fresh = Path(tmp, relative)
            committed = root / relative
            old = committed.read_text(encoding="utf-8").splitlines() if committed.exists() else []
            new = fresh.read_text(encoding="utf-8").splitlines() if fresh.exists() else []
            diff = list(
                difflib.unified_diff(
                    old, new, f"committed/{relative}", f"generated/{relative}", lineterm=""
                )
            )
            print(f"stale: {relative}", file=sys.stderr)
            print("\n".join(diff[:40]), file=sys.stderr)
    if stale:
        print(
            f"{len(stale)} generated file(s) are stale; run `headwatch dashboards generate` "
            "and commit the result",
            file=sys.stderr,
        )
        return 1
    print(f"{len(files)} generated files are up to date")
    return 0


def main(argv: list[str]) -> int:
    """Run `headwatch dashboards <command>` and return its exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        if args.command == "push":
            from dashboards.push import push_from_cli

            return push_from_cli(args, config)
        files = render_all(config)
        if args.command == "check":
            return _check(files, args.root)
        changed = write(files, args.root)
        print(f"{len(files)} files generated, {len(changed)} changed")
        return 0
    except DashboardsError as exc:
        print(f"headwatch dashboards {args.command}: {exc}", file=sys.stderr)
        return 2
