"""Per-head summaries of many head-stats messages: means, a high quantile, pattern labels, verdicts.

Usage:
    summary = summarize(sink.messages)
    summary.stats["entropy_nats"]   # (num_layers, num_query_heads) mean over the messages
    summary.patterns                # (num_layers, num_query_heads) pattern names

Pure numpy. Pattern labels and verdicts come from the exporter's aggregation when the caller
passes them (the demo and `analyze` fold the same messages through it); `classify_local` and
`verdicts_local` below apply the study's thresholds for callers that do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from collector.schema import HeadStatsMessage
from headwatch.report.errors import HeadwatchToolError

PATTERNS = (
    "uniform",
    "v_shaped",
    "sink",
    "recency",
    "scattered_middle",
    "concentrated_middle",
    "mixed",
)
SUMMARY_STATS = (
    "entropy_nats",
    "normalized_entropy",
    "sink_mass",
    "recent_mass",
    "middle_mass",
    "top1_mass",
    "top16_mass",
    "top256_mass",
    "keys_for_90pct",
    "eviction_error",
)
# Verdict bound on the p95 of the value-aware eviction error: a head is safe when dropping its
# middle keys moves its output by less than 5% of its norm on 95% of the sampled rows.
DEFAULT_ERROR_BOUND = 0.05
EVICTION_QUANTILE = 0.95


@dataclass(frozen=True)
class HeadSummary:
    """Per-(layer, query head) means of the statistics of a set of messages, with labels."""

    model_name: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    kv_dtype_bytes: int
    sink_tokens: int
    recent_tokens: int
    samples: int
    context_tokens: tuple[int, ...]
    stats: dict[str, np.ndarray]
    eviction_error_p95: np.ndarray
    patterns: np.ndarray
    safe_query_heads: np.ndarray
    safe_kv_heads: np.ndarray
    verdict_source: str = "local"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> int:
        """Return the number of query heads that share one KV head."""
        return self.num_query_heads // self.num_kv_heads


def stack_stats(messages: Sequence[HeadStatsMessage]) -> dict[str, np.ndarray]:
    """Return each summary statistic stacked over messages: (messages, layers, heads)."""
    if not messages:
        raise HeadwatchToolError("expected at least one head-stats message, got none")
    first = messages[0].header
    for m in messages[1:]:
        if (m.header.num_layers, m.header.num_query_heads) != (
            first.num_layers,
            first.num_query_heads,
        ):
            raise HeadwatchToolError(
                f"expected messages of one model layout {(first.num_layers, first.num_query_heads)}, "
                f"got {(m.header.num_layers, m.header.num_query_heads)}"
            )
    return {name: np.stack([m.stat(name) for m in messages]) for name in SUMMARY_STATS}


def classify_local(stats: dict[str, np.ndarray]) -> np.ndarray:
    """Return the study's pattern of each entry of per-head statistic arrays (any equal shape).

    Thresholds from the study's table: uniform at >= 90% of the maximum entropy; sink or recency
    when one region holds >= 80% of the mass; V-shaped when sink + recent hold >= 80% and each at
    least 10%; middle patterns when the middle holds >= 50%, concentrated below 2 nats (about 8
    tokens), scattered above.
    """
    norm, sink, recent = stats["normalized_entropy"], stats["sink_mass"], stats["recent_mass"]
    middle, entropy = stats["middle_mass"], stats["entropy_nats"]
    out = np.full(norm.shape, "mixed", dtype=object)
    rules = [
        (norm >= 0.9, "uniform"),
        (sink >= 0.8, "sink"),
        (recent >= 0.8, "recency"),
        ((sink + recent >= 0.8) & (sink >= 0.1) & (recent >= 0.1), "v_shaped"),
        ((middle >= 0.5) & (entropy < 2.0), "concentrated_middle"),
        (middle >= 0.5, "scattered_middle"),
    ]
    assigned = np.zeros(norm.shape, dtype=bool)
    for mask, name in rules:
        take = np.nan_to_num(mask, nan=0).astype(bool) & ~assigned
        out[take] = name
        assigned |= take
    return out


def majority_patterns(per_message: np.ndarray) -> np.ndarray:
    """Return the most frequent label over axis 0 of (messages, layers, heads) labels."""
    counts = np.stack([(per_message == p).sum(axis=0) for p in PATTERNS])
    return np.asarray(PATTERNS, dtype=object)[counts.argmax(axis=0)]


def verdicts_local(
    p95: np.ndarray, num_kv_heads: int, bound: float = DEFAULT_ERROR_BOUND
) -> tuple[np.ndarray, np.ndarray]:
    """Return (safe query heads, safe KV heads): p95 eviction error under `bound`, all heads of a KV head."""
    safe_q = np.nan_to_num(p95, nan=np.inf) <= bound
    layers, heads = safe_q.shape
    safe_kv = safe_q.reshape(layers, num_kv_heads, heads // num_kv_heads).all(axis=2)
    return safe_q, safe_kv


def summarize(
    messages: Sequence[HeadStatsMessage],
    patterns: np.ndarray | None = None,
    safe_kv_heads: np.ndarray | None = None,
    verdict_source: str = "local",
    error_bound: float = DEFAULT_ERROR_BOUND,
) -> HeadSummary:
    """Return the per-head summary of `messages`; labels and verdicts computed locally unless given."""
    stacked = stack_stats(messages)
    with np.errstate(all="ignore"):
        means = {k: np.nanmean(v, axis=0) for k, v in stacked.items()}
        p95 = np.nanquantile(stacked["eviction_error"], EVICTION_QUANTILE, axis=0)
    h = messages[0].header
    if patterns is None:
        patterns = majority_patterns(classify_local(stacked))
    safe_q, safe_kv = verdicts_local(p95, h.num_kv_heads, error_bound)
    if safe_kv_heads is not None:
        if safe_kv_heads.shape != safe_kv.shape:
            raise HeadwatchToolError(
                f"expected safe KV heads of shape {safe_kv.shape}, got {safe_kv_heads.shape}"
            )
        safe_kv = safe_kv_heads.astype(bool)
        safe_q = np.repeat(safe_kv, h.num_query_heads // h.num_kv_heads, axis=1)
    return HeadSummary(
        model_name=h.model_name,
        num_layers=h.num_layers,
        num_query_heads=h.num_query_heads,
        num_kv_heads=h.num_kv_heads,
        head_dim=h.head_dim,
        kv_dtype_bytes=h.kv_dtype_bytes,
        sink_tokens=h.sink_tokens,
        recent_tokens=h.recent_tokens,
        samples=len(messages),
        context_tokens=tuple(m.header.context_tokens for m in messages),
        stats=means,
        eviction_error_p95=p95,
        patterns=np.asarray(patterns, dtype=object),
        safe_query_heads=safe_q,
        safe_kv_heads=safe_kv,
        verdict_source=verdict_source,
    )
