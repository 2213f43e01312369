"""Write a complete report folder: figures, study-style table, heads.json, policy and index.html.

Usage:
    path = build_report(out, "headwatch analyze", summary, model, prompt, facts)

Shared by `headwatch demo` and `headwatch analyze`. The folder appears only once complete
(see headwatch.report.html.staged_report).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from headwatch.prompts import Prompt
from headwatch.report.data import write_summary_json
from headwatch.report.figures import heatmaps, pattern_rows
from headwatch.report.html import staged_report, write_index
from headwatch.report.rows import last_row_attention
from headwatch.report.summary import HeadSummary
from headwatch.report.table import markdown_table, pattern_map_text, study_rows


def default_out(kind: str) -> Path:
    """Return ./reports/<kind>-<UTC timestamp>/ (./reports is git-ignored)."""
    return Path("reports") / f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def build_report(
    out: Path,
    title: str,
    summary: HeadSummary,
    model: Any,
    prompt: Prompt,
    facts: dict[str, str],
) -> Path:
    """Write the report for `summary` into `out`, with attention rows of `prompt`; return `out`."""
    from headwatch.policy import from_summary, write_policy

    rows = study_rows(summary)
    pattern_map = pattern_map_text(summary)
    with staged_report(out) as folder:
        ids = torch.tensor([prompt.ids], dtype=torch.long, device=model.device)
        figures = heatmaps(summary, folder)
        figures += pattern_rows(summary, last_row_attention(model, ids), prompt, folder)
        write_summary_json(summary, rows, folder / "heads.json")
        write_policy(from_summary(summary), folder / "policy")
        (folder / "table.md").write_text(markdown_table(rows) + "\n", encoding="utf-8")
        facts = {
            **facts,
            "sampled rows": str(summary.samples),
            "sink / recent tokens": f"{summary.sink_tokens} / {summary.recent_tokens}",
            "KV heads safe for sink+recent": f"{int(summary.safe_kv_heads.sum())} of {summary.safe_kv_heads.size}",
            "verdicts": summary.verdict_source,
            "files": "heads.json (per-head statistics), table.md, policy/ (policy.json, duo_attention/)",
        }
        write_index(folder, title, facts, figures, rows, pattern_map)
    return out
