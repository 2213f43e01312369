"""The `headwatch` command: one entry point that dispatches to each component's own `main`.

Usage:
    headwatch exporter --help
    headwatch run -- python serve.py

Each subcommand lives in its own module and is imported only when chosen, so that an
exporter-only install never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "headwatch.demo",
        "run the bundled model with the collector attached and show its head patterns",
    ),
    "analyze": (
        "headwatch.analyze",
        "measure every head of a local causal-LM directory on long prompts",
    ),
    "validate": (
        "headwatch.validate",
        "measure what restricting safe heads to sink+recent keys does to the output",
    ),
    "policy": (
        "headwatch.policy",
        "write a per-KV-head compression policy from verdicts or an analysis",
    ),
    "run": (
        "collector.instrument",
        "run an unmodified Python serving program with the collector attached",
    ),
    "exporter": ("exporter.cli", "consume head statistics from Kafka and serve Prometheus metrics"),
    "dashboards": ("dashboards.cli", "generate, check or push Grafana dashboards and alert rules"),
    "stack": (
        "headwatch.localstack.cli",
        "start or stop the local Kafka/Prometheus/Alertmanager stack",
    ),
    "train": ("headwatch.training.train", "train the small bundled model from an offline corpus"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: headwatch <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `headwatch <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `headwatch <command> ...` to the command's module and return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"headwatch: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"headwatch {name}: cannot import {module_name} ({exc}); "
            "is the matching extra installed (pip install 'headwatch[all]')?",
            file=sys.stderr,
        )
        return 2
    entry: Callable[[list[str]], int] = module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
