"""Pattern maps per kind of request: the same heads label differently on needles and documents.

Usage:
    text = maps_by_kind(prompts, messages)   # "" when messages and prompts do not pair up
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from collector.schema import HeadStatsMessage
from headwatch.prompts import Prompt
from headwatch.report.summary import summarize
from headwatch.report.table import CODES


def maps_by_kind(prompts: Sequence[Prompt], messages: Sequence[HeadStatsMessage]) -> str:
    """Return one compact pattern map per prompt kind (the exporter's rules on those rows only).

    Needs one message per prompt, in prompt order (the last prompt token of each request);
    returns "" otherwise, or when there is only one kind.
    """
    if len(messages) != len(prompts) or len({p.kind for p in prompts}) < 2:
        return ""
    blocks = []
    for kind in sorted({p.kind for p in prompts}):
        rows = [m for p, m in zip(prompts, messages, strict=True) if p.kind == kind]
        summary = summarize(rows, verdict_source="exporter rules on these rows")
        codes = np.vectorize(lambda name: CODES.get(str(name), "?"))(summary.patterns)
        lines = [f"{kind} prompts only ({len(rows)} rows):"]
        lines += [f"{layer:>5} | " + "  ".join(row) for layer, row in enumerate(codes.tolist())]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
