"""One line per invalid setting of a pydantic-settings model, for a command's stderr.

Usage:
    except ValidationError as exc:
        for line in invalid_settings(exc): print(f"headwatch stack: {line}", file=sys.stderr)
"""

from __future__ import annotations

from pydantic import ValidationError


def _expectation(message: str) -> str:
    """Return what pydantic's message says was expected: "Input should be a valid integer" -> "a valid integer"."""
    subject, should, rest = message.partition(" should ")
    if not should:
        return message
    if subject == "Input":
        rest = rest.removeprefix("be ")
        return rest if rest.startswith(("a ", "an ", "one of")) else f"a value {rest}"
    verb, _, tail = rest.partition(" ")
    # "String should match pattern 'x'" -> "a string matching pattern 'x'"
    joined = {"match": "matching", "have": "with"}.get(verb)
    return (
        f"a {subject.lower()} {joined} {tail}"
        if joined
        else f"a {subject.lower()} that should {rest}"
    )


def invalid_settings(exc: ValidationError) -> list[str]:
    """Return "field: expected ..., got value" for each error of `exc` (the field dotted when nested)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        got = error.get("input")
        if error["type"] == "extra_forbidden":
            lines.append(f"{where}: expected no such setting, got {where}={got!r}")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        if message.startswith("expected") and ", got " in message:
            lines.append(f"{where}: {message}")  # the model's own validator wrote it that way
            continue
        lines.append(f"{where}: expected {_expectation(message)}, got {got!r}")
    return lines
