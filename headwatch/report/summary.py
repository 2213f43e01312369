"""Per-head summaries of many head-stats messages: means, a high quantile, pattern labels, verdicts.

Usage:
    summary = summarize(sink.messages)
    summary.stats["entropy_nats"]   # (num_layers, num_query_heads) mean over the messages
    summary.patterns                # (num_layers, num_query_heads) pattern names

Pure numpy. Patterns and verdicts use the exporter's own rules (exporter.patterns,
exporter.verdicts), so the table a research run prints agrees with what a running exporter says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from collector.schema import HeadStatsMessage
from exporter.patterns import PATTERNS, PatternInputs, PatternThresholds, classify, dominant
from exporter.verdicts import VerdictPolicy, eviction_quantiles, kv_head_safe, update_safe
from exporter.window import EVICTION_BINS, eviction_bin
from headwatch.report.errors import HeadwatchToolError

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
# Few samples make the exporter's upper confidence bound conservative (below about 20 samples it
# is the largest error seen), so one-off analyses need no minimum count of their own.
ANALYSIS_POLICY = VerdictPolicy(min_samples=1)


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
    safe_query_heads: np.ndarray  # query heads whose KV head is safe (compression is per KV head)
    safe_kv_heads: np.ndarray
    verdict_source: str = "local"
    error_bound: float = 0.05  # the eviction-error bound the verdicts were taken at

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


def classify_rows(stacked: dict[str, np.ndarray], thresholds: PatternThresholds) -> np.ndarray:
    """Return the exporter's pattern code of every sampled row: int8 (messages, layers, heads)."""
    inputs = PatternInputs(
        entropy_nats=stacked["entropy_nats"],
        normalized_entropy=stacked["normalized_entropy"],
        sink_mass=stacked["sink_mass"],
        recent_mass=stacked["recent_mass"],
        middle_mass=stacked["middle_mass"],
        top_mass={k: stacked[f"top{k}_mass"] for k in (1, 16, 256)},
    )
    return classify(inputs, thresholds)


def head_patterns(codes: np.ndarray, dominance: float) -> np.ndarray:
    """Return each head's pattern name from per-row codes (messages, layers, heads), as the exporter does."""
    counts = np.stack([(codes == i).sum(axis=0) for i in range(len(PATTERNS))], axis=-1)
    return np.asarray(PATTERNS, dtype=object)[dominant(counts, dominance)]


def head_verdicts(
    errors: np.ndarray, num_kv_heads: int, policy: VerdictPolicy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (p95, safe query heads, safe KV heads) from eviction errors (messages, layers, heads).

    The exporter's rule: an upper confidence bound of the p95 under the entry bound, with the
    policy's minimum sample count; with few samples the bound is the largest error seen.
    """
    valid = np.isfinite(errors)
    bins = eviction_bin(errors)
    hist = np.stack([((bins == b) & valid).sum(axis=0) for b in range(EVICTION_BINS)], axis=-1)
    point, upper = eviction_quantiles(hist, policy)
    safe_q = update_safe(np.zeros(point.shape, dtype=bool), upper, valid.sum(axis=0), policy)
    return point, safe_q, kv_head_safe(safe_q, num_kv_heads)


def summarize(
    messages: Sequence[HeadStatsMessage],
    thresholds: PatternThresholds | None = None,
    policy: VerdictPolicy = ANALYSIS_POLICY,
    patterns: np.ndarray | None = None,
    safe_kv_heads: np.ndarray | None = None,
    verdict_source: str = "exporter rules on these samples",
    verdict_bound: float | None = None,
) -> HeadSummary:
    """Return the per-head summary of `messages` with the exporter's patterns and verdicts.

    `patterns` (layers, heads) names and `safe_kv_heads` (layers, kv_heads), when given, replace
    the labels and verdicts computed here (e.g. with those of a running exporter's aggregation);
    `verdict_bound` is then the bound those verdicts were taken at (default: `policy`'s).
    """
    thresholds = thresholds or PatternThresholds()
    stacked = stack_stats(messages)
    with np.errstate(all="ignore"):
        means = {k: np.nanmean(v, axis=0) for k, v in stacked.items()}
    h = messages[0].header
    if patterns is None:
        patterns = head_patterns(classify_rows(stacked, thresholds), thresholds.dominance)
    p95, _, safe_kv = head_verdicts(stacked["eviction_error"], h.num_kv_heads, policy)
    if safe_kv_heads is not None:
        if safe_kv_heads.shape != safe_kv.shape:
            raise HeadwatchToolError(
                f"expected safe KV heads of shape {safe_kv.shape}, got {safe_kv_heads.shape}"
            )
        safe_kv = safe_kv_heads.astype(bool)
    # Compression acts per KV head: a query head is compressible when its KV head is.
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
        error_bound=policy.enter_bound if verdict_bound is None else verdict_bound,
    )
