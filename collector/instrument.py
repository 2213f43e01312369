"""`headwatch run -- <command ...>`: run an unmodified Python program with the collector attached.

Usage:
    HEADWATCH_COLLECTOR_SAMPLE_RATE=0.05 headwatch run -- transformers serve ./my-model --port 8000

Like `opentelemetry-instrument`, it puts a `sitecustomize` on PYTHONPATH; in the child process it
wraps `PreTrainedModel.from_pretrained`, so every model the program loads is measured with the
settings of the `HEADWATCH_COLLECTOR_*` variables. The exit status is the program's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

BOOTSTRAP = Path(__file__).with_name("_bootstrap")
USAGE = """usage: headwatch run [--] <command> [args ...]

Run a Python program (e.g. `transformers serve <model dir>`) with the headwatch collector attached
to every transformers model it loads. Configure with HEADWATCH_COLLECTOR_* variables, e.g.
HEADWATCH_COLLECTOR_SAMPLE_RATE, HEADWATCH_COLLECTOR_SINK (kafka|file|memory),
HEADWATCH_COLLECTOR_KAFKA__BOOTSTRAP_SERVERS, HEADWATCH_COLLECTOR_FILE_PATH,
HEADWATCH_COLLECTOR_METRICS_PORT."""


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """Return the environment with the bootstrap folder and this project first on PYTHONPATH."""
    env = dict(environ)
    project = str(Path(__file__).resolve().parents[1])
    parts = [
        str(BOOTSTRAP),
        project,
        *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p],
    ]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def main(argv: list[str]) -> int:
    """Run the command with the collector attached; return its exit status."""
    args = list(argv)
    if args and args[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    from collector.errors import SettingsError
    from collector.settings import load_settings

    try:
        load_settings()  # fail fast, before starting the program, on bad HEADWATCH_COLLECTOR_* values
    except SettingsError as exc:
        print(f"headwatch run: {exc}", file=sys.stderr)
        return 2
    try:
        child = subprocess.Popen(args, env=child_environment(dict(os.environ)))
    except OSError as exc:
        print(f"headwatch run: cannot start {args[0]!r}: {exc}", file=sys.stderr)
        return 127

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
