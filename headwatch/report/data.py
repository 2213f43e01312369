"""The per-head statistics JSON that `analyze` and the demo write, and that `policy` reads.

Usage:
    write_summary_json(summary, rows, path)
    summary = read_summary_json(path)

Format `headwatch.head-summary.v1`: model layout, S and R, the sampled context lengths, one
object per (layer, query head) with the mean statistics, the p95 eviction error, the pattern and
the verdict, and one object per (layer, KV head) with its verdict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headwatch.report.errors import PolicyError
from headwatch.report.summary import SUMMARY_STATS, HeadSummary
from headwatch.report.table import StudyRow

FORMAT = "headwatch.head-summary.v1"


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 7)


def summary_to_dict(summary: HeadSummary, rows: Sequence[StudyRow] = ()) -> dict[str, Any]:
    """Return the JSON-ready dict of a summary and its study-style table rows."""
    group = summary.group
    heads = []
    for layer in range(summary.num_layers):
        for head in range(summary.num_query_heads):
            item: dict[str, Any] = {"layer": layer, "head": head, "kv_head": head // group}
            item.update({k: _num(summary.stats[k][layer, head]) for k in SUMMARY_STATS})
            item["eviction_error_p95"] = _num(summary.eviction_error_p95[layer, head])
            item["pattern"] = str(summary.patterns[layer, head])
            item["safe"] = bool(summary.safe_query_heads[layer, head])
            heads.append(item)
    kv_heads = [
        {"layer": layer, "kv_head": kv, "safe": bool(summary.safe_kv_heads[layer, kv])}
        for layer in range(summary.num_layers)
        for kv in range(summary.num_kv_heads)
    ]
    return {
        "format": FORMAT,
        "model_name": summary.model_name,
        "num_layers": summary.num_layers,
        "num_query_heads": summary.num_query_heads,
        "num_kv_heads": summary.num_kv_heads,
        "head_dim": summary.head_dim,
        "kv_dtype_bytes": summary.kv_dtype_bytes,
        "sink_tokens": summary.sink_tokens,
        "recent_tokens": summary.recent_tokens,
        "samples": summary.samples,
        "context_tokens": list(summary.context_tokens),
        "verdict_source": summary.verdict_source,
        "error_bound": summary.error_bound,
        "heads": heads,
        "kv_heads": kv_heads,
        "table": [r.as_dict() for r in rows],
    }


def write_summary_json(summary: HeadSummary, rows: Sequence[StudyRow], path: Path) -> None:
    """Write the summary JSON to `path`."""
    path.write_text(json.dumps(summary_to_dict(summary, rows), indent=1) + "\n", encoding="utf-8")


def read_summary_json(path: Path) -> HeadSummary:
    """Return the summary stored at `path`, or raise PolicyError naming the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PolicyError(f"expected an analysis JSON at {path}, got no such file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(
            f"expected an analysis JSON at {path}, got unreadable content ({exc})"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PolicyError(f"expected format {FORMAT!r} in {path}, got {got!r}")
    try:
        layers, heads, kv = data["num_layers"], data["num_query_heads"], data["num_kv_heads"]
        stats = {k: np.full((layers, heads), np.nan) for k in SUMMARY_STATS}
        p95 = np.full((layers, heads), np.nan)
        patterns = np.full((layers, heads), "mixed", dtype=object)
        safe_q = np.zeros((layers, heads), dtype=bool)
        for item in data["heads"]:
            at = (int(item["layer"]), int(item["head"]))
            for k in SUMMARY_STATS:
                stats[k][at] = np.nan if item[k] is None else float(item[k])
            p95[at] = np.nan if item["eviction_error_p95"] is None else item["eviction_error_p95"]
            patterns[at] = str(item["pattern"])
            safe_q[at] = bool(item["safe"])
        safe_kv = np.zeros((layers, kv), dtype=bool)
        for item in data["kv_heads"]:
            safe_kv[int(item["layer"]), int(item["kv_head"])] = bool(item["safe"])
        return HeadSummary(
            model_name=str(data["model_name"]),
            num_layers=layers,
            num_query_heads=heads,
            num_kv_heads=kv,
            head_dim=int(data["head_dim"]),
            kv_dtype_bytes=int(data["kv_dtype_bytes"]),
            sink_tokens=int(data["sink_tokens"]),
            recent_tokens=int(data["recent_tokens"]),
            samples=int(data["samples"]),
            context_tokens=tuple(int(c) for c in data["context_tokens"]),
            stats=stats,
            eviction_error_p95=p95,
            patterns=patterns,
            safe_query_heads=safe_q,
            safe_kv_heads=safe_kv,
            verdict_source=str(data.get("verdict_source", "analysis")),
            error_bound=float(data.get("error_bound", 0.05)),  # files written before it existed
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PolicyError(
            f"expected a complete {FORMAT} document in {path}, got an error at {exc!r}"
        ) from exc
