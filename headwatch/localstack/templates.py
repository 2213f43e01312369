"""Config templating: deploy/local/*.tmpl files with ${name} placeholders, filled in strictly."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from pathlib import Path

from headwatch.localstack.errors import StackConfigError


def render(template: str, values: Mapping[str, object]) -> str:
    """Return `template` with every ${name} replaced; a missing or unused value is an error.

    Usage:
        render("listeners=PLAINTEXT://${host}:${port}", {"host": "127.0.0.1", "port": 9092})
    """
    tmpl = string.Template(template)
    wanted = set(tmpl.get_identifiers())
    missing = sorted(wanted - set(values))
    if missing:
        raise StackConfigError(f"expected values for {missing}, got only {sorted(values)}")
    unused = sorted(set(values) - wanted)
    if unused:
        raise StackConfigError(f"expected only values for {sorted(wanted)}, got also {unused}")
    text_values: dict[str, str] = {}
    for name, value in values.items():
        text = str(value)
        # One value per line: a newline would smuggle extra settings into the file.
        if "\n" in text or "\r" in text:
            raise StackConfigError(f"expected a one-line value for {name}, got {text!r}")
        text_values[name] = text
    try:
        return tmpl.substitute(text_values)
    except ValueError as exc:  # a stray "$" that is not a placeholder
        raise StackConfigError(f"expected only ${{name}} placeholders, got {exc}") from exc


def yaml_string(value: str) -> str:
    """Return `value` quoted for YAML (JSON strings are valid YAML scalars)."""
    return json.dumps(value)


def render_file(template_path: Path, values: Mapping[str, object], target: Path) -> Path:
    """Render `template_path` with `values` into `target` and return `target`."""
    target.write_text(render(template_path.read_text(encoding="utf-8"), values), encoding="utf-8")
    return target
