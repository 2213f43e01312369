"""The external programs the stack runs, found on PATH or named in a clear error."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from headwatch.localstack.errors import MissingToolError

# tool -> (program names to look for, Debian package that provides it)
TOOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "java": (("java",), "default-jre-headless"),
    "mvn": (("mvn",), "maven"),
    "prometheus": (("prometheus",), "prometheus"),
    # Debian renames the upstream `alertmanager` binary.
    "alertmanager": (("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager"),
}

# Kafka 4 brokers need Java 17 (KIP-750).
MIN_JAVA_MAJOR = 17


def install_hint(package: str) -> str:
    """Return the one line that installs `package` on Debian, and the script that does it all."""
    return (
        f"install it with: apt-get install -y --no-install-recommends {package} "
        "(scripts/setup.sh installs everything the stack needs)"
    )


def find_tool(name: str, which: Callable[[str], str | None] = shutil.which) -> Path:
    """Return the path of tool `name` (a key of TOOLS) or raise MissingToolError saying how to get it."""
    if name not in TOOLS:
        raise MissingToolError(f"expected one of {sorted(TOOLS)}, got {name!r}")
    candidates, package = TOOLS[name]
    for candidate in candidates:
        found = which(candidate)
        if found:
            return Path(found)
    raise MissingToolError(
        f"{name} not found on PATH (looked for {', '.join(candidates)}); {install_hint(package)}"
    )


def parse_java_major(version_output: str) -> int:
    """Return the major version from `java -version` output ("1.8.0_392" -> 8, "17.0.15" -> 17)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        raise MissingToolError(
            f"expected `java -version` to print a version, got {version_output!r}"
        )
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:
        major = int(match.group(2))
    return major


def require_java(
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[[Sequence[str]], str] | None = None,
) -> Path:
    """Return the path of a Java 17+ runtime or raise MissingToolError naming what to install."""
    java = find_tool("java", which)
    output = (run or _java_version_output)([str(java), "-version"])
    major = parse_java_major(output)
    if major < MIN_JAVA_MAJOR:
        raise MissingToolError(
            f"Kafka 4 needs Java {MIN_JAVA_MAJOR} or newer, got Java {major} at {java}; "
            f"{install_hint('openjdk-17-jre-headless')}"
        )
    return java


def _java_version_output(argv: Sequence[str]) -> str:
    # `java -version` writes to stderr.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return done.stderr + done.stdout
