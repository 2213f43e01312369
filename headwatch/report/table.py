"""The study-style table and the layer x head pattern map, as plain rows and as text.

Usage:
    rows = study_rows(summary)
    print(pattern_map_text(summary)); print(markdown_table(rows))

One row per pattern present: which layers it occurs in, its share of the heads, its entropy
(with the number of tokens a uniform distribution of that entropy would cover), where its mass
sits, how many keys hold 90% of it, and whether the measured verdicts call it compressible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from headwatch.report.summary import PATTERNS, HeadSummary

CODES = {
    "uniform": "U",
    "v_shaped": "V",
    "sink": "S",
    "recency": "R",
    "scattered_middle": "M",
    "concentrated_middle": "C",
    "mixed": "?",
}


@dataclass(frozen=True)
class StudyRow:
    """One row of the study-style table."""

    pattern: str
    layers: str
    heads: int
    share_of_heads: float
    entropy_nats: float
    uniform_over_tokens: float
    sink_mass: float
    recent_mass: float
    middle_mass: float
    top16_mass: float
    keys_for_90pct: float
    safe_heads: int
    compressible: str

    def as_dict(self) -> dict[str, object]:
        """Return the row as a JSON-ready dict."""
        return asdict(self)


def layer_ranges(layers: Sequence[int]) -> str:
    """Return sorted layer indices as ranges, e.g. [0, 1, 2, 5] -> "0-2, 5"."""
    values = sorted(set(layers))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts)


def _compressible(safe: int, heads: int, sink: int, recent: int) -> str:
    if safe == heads:
        return f"yes: all {heads} keep sink {sink} + recent {recent}"
    if safe == 0:
        return "no (eviction error above bound)"
    return f"partly: {safe}/{heads} heads keep sink {sink} + recent {recent}"


def study_rows(summary: HeadSummary) -> list[StudyRow]:
    """Return one table row per pattern present, in the study's order."""
    total = summary.num_layers * summary.num_query_heads
    rows: list[StudyRow] = []
    for pattern in PATTERNS:
        mask = summary.patterns == pattern
        n = int(mask.sum())
        if n == 0:
            continue
        layers = [int(i) for i in np.nonzero(mask.any(axis=1))[0]]

        def mean(name: str, m: np.ndarray = mask) -> float:
            return float(np.nanmean(summary.stats[name][m]))

        entropy = mean("entropy_nats")
        safe = int(summary.safe_query_heads[mask].sum())
        rows.append(
            StudyRow(
                pattern=pattern,
                layers=layer_ranges(layers),
                heads=n,
                share_of_heads=n / total,
                entropy_nats=entropy,
                uniform_over_tokens=math.exp(entropy),
                sink_mass=mean("sink_mass"),
                recent_mass=mean("recent_mass"),
                middle_mass=mean("middle_mass"),
                top16_mass=mean("top16_mass"),
                keys_for_90pct=float(np.nanmedian(summary.stats["keys_for_90pct"][mask])),
                safe_heads=safe,
                compressible=_compressible(safe, n, summary.sink_tokens, summary.recent_tokens),
            )
        )
    return rows


HEADER = (
    "pattern",
    "layers",
    "heads (share)",
    "entropy nats (~uniform over)",
    "mass sink / recent / middle",
    "top-16 mass",
    "keys for 90%",
    "compressible? (measured)",
)


def row_cells(row: StudyRow) -> tuple[str, ...]:
    """Return the formatted cells of one row, in HEADER order."""
    return (
        row.pattern,
        row.layers,
        f"{row.heads} ({row.share_of_heads:.0%})",
        f"{row.entropy_nats:.2f} (~{row.uniform_over_tokens:,.0f} tokens)",
        f"{row.sink_mass:.1%} / {row.recent_mass:.1%} / {row.middle_mass:.1%}",
        f"{row.top16_mass:.1%}",
        f"{row.keys_for_90pct:,.0f}",
        row.compressible,
    )


def markdown_table(rows: Sequence[StudyRow]) -> str:
    """Return the rows as a GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def pattern_map_text(summary: HeadSummary) -> str:
    """Return the layer x head map of pattern codes, a `*` after heads whose KV head is safe."""
    width = summary.num_query_heads
    head_line = "".join(f"{h:>3}" for h in range(width))
    lines = [f"layer |{head_line}"]
    lines.append("------+" + "-" * (3 * width))
    for layer in range(summary.num_layers):
        cells = []
        for h in range(width):
            code = CODES.get(str(summary.patterns[layer, h]), "?")
            star = "*" if summary.safe_kv_heads[layer, h // summary.group] else " "
            cells.append(f" {code}{star}")
        lines.append(f"{layer:>5} |" + "".join(cells))
    legend = ", ".join(f"{c} {p}" for p, c in CODES.items())
    lines.append(f"codes: {legend}; * = KV head safe for sink+recent")
    return "\n".join(lines)
