"""`headwatch stack up|down|status|fetch`: run the local Kafka/Prometheus/Alertmanager by hand.

Usage:
    headwatch stack up        # prints the bootstrap address, the URLs and HEADWATCH_TEST_* lines
    headwatch stack down      # stops exactly the processes `up` started
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from headwatch.localstack.errors import LocalStackError, StackConfigError, StateFileError
from headwatch.localstack.kafka_fetch import cached_kafka, fetch_kafka, pinned_kafka_version
from headwatch.localstack.paths import StackPaths, find_paths
from headwatch.localstack.settings import StackSettings
from headwatch.localstack.stack import (
    SERVICES,
    LocalStack,
    running_services,
    stop_recorded,
)
from headwatch.localstack.state import StackState, dump_state, load_state, reuse_environment
from headwatch.settings_errors import invalid_settings

logger = logging.getLogger(__name__)

EXIT_BAD_CONFIG = 2  # a flag or HEADWATCH_STACK_* value out of its domain, as for the exporter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwatch stack",
        description="Start, stop or inspect the local Kafka, Prometheus and Alertmanager "
        "(127.0.0.1, no systemd). Ports default to 9092/9090/9093 and fall back to free ones.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the services and write .cache/stack/state.json")
    up.add_argument("--kafka-port", type=int, help="Kafka listener port (0: any free port)")
    up.add_argument("--prometheus-port", type=int, help="Prometheus port (0: any free port)")
    up.add_argument("--alertmanager-port", type=int, help="Alertmanager port (0: any free port)")
    up.add_argument("--strict-ports", action="store_true", help="fail when a port is busy")
    up.add_argument("--webhook-url", help="Alertmanager webhook receiver URL")
    up.add_argument("--only", choices=SERVICES, action="append",
                    help="start only this service (repeatable)")  # fmt: skip
    commands.add_parser("down", help="stop the services `up` started")
    commands.add_parser("status", help="show what runs and where")
    fetch = commands.add_parser(
        "fetch", help="fetch the pinned Kafka jars into .cache/kafka/ (once)"
    )
    fetch.add_argument("--cached", action="store_true",
                       help="fetch nothing; exit 1 when the jars are not cached yet")  # fmt: skip
    return parser


def _settings(args: argparse.Namespace) -> StackSettings:
    overrides: dict[str, object] = {
        "kafka_port": args.kafka_port,
        "prometheus_port": args.prometheus_port,
        "alertmanager_port": args.alertmanager_port,
        "alertmanager_webhook_url": args.webhook_url,
    }
    if args.strict_ports:
        overrides["strict_ports"] = True
    return StackSettings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


def _describe(state: StackState) -> str:
    lines = []
    if state.kafka_bootstrap:
        lines.append(f"kafka         {state.kafka_bootstrap}  (Apache Kafka {state.kafka_version})")
    if state.prometheus_url:
        lines.append(f"prometheus    {state.prometheus_url}")
    if state.alertmanager_url:
        lines.append(f"alertmanager  {state.alertmanager_url}")
    lines.append(f"logs and data {state.run_dir}")
    lines.append("To run the tests against this stack instead of starting one per session:")
    lines += [f"  export {name}={value}" for name, value in reuse_environment(state).items()]
    return "\n".join(lines)


def _up(args: argparse.Namespace, paths: StackPaths) -> int:
    previous = load_state(paths.state_file)
    if previous is not None:
        if running_services(previous):
            print("headwatch stack: already running (`headwatch stack down` stops it)")
            print(_describe(previous))
            return 0
        stop_recorded(previous, 1.0)  # nothing runs: only the stale run folder goes
        paths.state_file.unlink(missing_ok=True)
    settings = _settings(args)
    paths.stack_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=paths.stack_dir))
    stack = LocalStack(settings, paths, run_dir)
    try:
        stack.start(args.only or SERVICES)
    except BaseException:
        # start() stopped whatever had started; logs stay for a look, an empty folder goes.
        if any(run_dir.rglob("*.log")):
            print(f"headwatch stack: logs of the failed start are in {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    state = stack.state()
    dump_state(state, paths.state_file)
    print(_describe(state))
    return 0


def _down(paths: StackPaths) -> int:
    state = load_state(paths.state_file)
    if state is None:
        print("headwatch stack: nothing to stop (no state file)")
        return 0
    stopped = stop_recorded(state, StackSettings().stop_timeout_seconds)
    paths.state_file.unlink(missing_ok=True)
    print(f"headwatch stack: stopped {', '.join(stopped) or 'nothing (none was running)'}")
    return 0


def _status(paths: StackPaths) -> int:
    state = load_state(paths.state_file)
    if state is None:
        print("headwatch stack: not running")
        return 1
    alive = {service.name for service in running_services(state)}
    for service in state.services:
        status = "running" if service.name in alive else "STOPPED"
        print(f"{service.name:<13} {status:<8} pid {service.pid:<7} {service.address}")
    print(_describe(state))
    return 0 if len(alive) == len(state.services) else 1


def _fetch(paths: StackPaths, only_check: bool) -> int:
    dist = cached_kafka(paths) if only_check else fetch_kafka(paths)
    if dist is None:
        print(f"Apache Kafka {pinned_kafka_version(paths.pom)}: not fetched yet")
        return 1
    print(f"Apache Kafka {dist.version}: {dist.libs}")
    return 0


def main(argv: list[str]) -> int:
    """Run `headwatch stack ...` and return its exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # kafka-python narrates every connection at INFO; the readiness probe makes several.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        paths = find_paths(StackSettings().cache_dir)
        if args.command == "up":
            return _up(args, paths)
        if args.command == "down":
            return _down(paths)
        if args.command == "status":
            return _status(paths)
        return _fetch(paths, only_check=args.cached)
    except (LocalStackError, StackConfigError, StateFileError) as exc:
        print(f"headwatch stack {args.command}: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:  # StackSettings from the flags and HEADWATCH_STACK_* variables
        for line in invalid_settings(exc):
            print(f"headwatch stack {args.command}: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
