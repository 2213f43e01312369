"""Pure helpers over PromQL text: which metric names an expression reads.

Not a full parser: it removes what cannot be a metric name (strings, label matchers, ranges,
grouping clauses, Grafana variables, function calls) and keeps the identifiers left over. That is
enough to check every query against the metric catalogue at generation time.
"""

from __future__ import annotations

import re

_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
        "offset", "bool", "inf", "nan", "atan2", "start", "end",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_DURATION = re.compile(r"\b(?:\d+(?:ms|[smhdwy]))+\b")
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b|\b0x[0-9a-fA-F]+\b")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> frozenset[str]:
    """Return the metric names an expression selects.

    >>> sorted(metric_names('sum by (model_name) (rate(headwatch_model_messages_total[5m]))'))
    ['headwatch_model_messages_total']
    """
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _DURATION.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation, not a metric
        word = match.group(0)
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return frozenset(names)


def label_matchers(**labels: str) -> str:
    """Return a `{...}` selector body: `name="value"`, or `name=~"value"` for values with `$`."""
    parts = []
    for name, value in labels.items():
        op = "=~" if value.startswith("$") else "="
        parts.append(f'{name}{op}"{value}"')
    return "{" + ", ".join(parts) + "}"
