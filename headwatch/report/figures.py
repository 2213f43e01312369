"""PNG figures of a head summary: layer x head heatmaps and one attention row per pattern.

Usage:
    files = heatmaps(summary, out_dir)                       # [Figure(...), ...]
    files += pattern_rows(summary, rows, prompt, out_dir)    # one figure per pattern present

matplotlib with the Agg backend (no display). Each function returns the figures it wrote with
their captions, which the HTML page shows under each image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headwatch.prompts import Prompt
from headwatch.report.summary import PATTERNS, HeadSummary

PATTERN_COLOURS = {
    "uniform": "#9e9e9e",
    "v_shaped": "#1f77b4",
    "sink": "#2ca02c",
    "recency": "#ff7f0e",
    "scattered_middle": "#9467bd",
    "concentrated_middle": "#d62728",
    "mixed": "#f0e442",
}


@dataclass(frozen=True)
class Figure:
    """A written figure: file name (relative to the report folder) and caption."""

    file: str
    caption: str


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# Small models get their values written into the cells; large ones would be unreadable.
_ANNOTATE_MAX_CELLS = 128


def _heatmap(
    ax: Any, data: np.ndarray, title: str, vmin: float, vmax: float, cmap: Any, fmt: str = "{:.2f}"
) -> Any:
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if data.size <= _ANNOTATE_MAX_CELLS and fmt:
        mid = (vmin + vmax) / 2
        for (row, col), value in np.ndenumerate(data):
            if np.isfinite(value):
                colour = "white" if (value < mid) == (cmap != "Reds") else "black"
                ax.text(
                    col, row, fmt.format(value), ha="center", va="center", fontsize=7, color=colour
                )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    ax.tick_params(labelsize=7)
    return image


def heatmaps(summary: HeadSummary, out_dir: Path) -> list[Figure]:
    """Write the entropy, region-mass, eviction-error and pattern heatmaps; return them."""
    plt = _pyplot()
    figures: list[Figure] = []
    ctx = summary.context_tokens
    span = f"{summary.samples} sampled rows, contexts {min(ctx):,}-{max(ctx):,} tokens"

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    entropy = summary.stats["entropy_nats"]
    top = math.log(max(ctx))
    fig.colorbar(
        _heatmap(
            ax, entropy, f"Mean attention entropy (nats; max ln N = {top:.2f})", 0.0, top, "viridis"
        ),
        ax=ax,
    )
    _save(fig, out_dir / "entropy.png")
    figures.append(
        Figure(
            "entropy.png",
            f"Mean entropy of the last token's attention per layer and head ({span}). Bright = spread over many tokens; dark = a few tokens.",
        )
    )

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, region in zip(axes, ("sink", "recent", "middle"), strict=True):
        fig.colorbar(
            _heatmap(ax, summary.stats[f"{region}_mass"], f"{region} mass", 0.0, 1.0, "magma"),
            ax=ax,
        )
    fig.suptitle(
        f"Attention mass by region: sink = first {summary.sink_tokens} tokens, recent = last {summary.recent_tokens}"
    )
    _save(fig, out_dir / "masses.png")
    figures.append(
        Figure(
            "masses.png",
            f"Mean share of attention mass on the first {summary.sink_tokens} tokens (sink), the last {summary.recent_tokens} tokens (recent) and everything in between (middle), per layer and head.",
        )
    )

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    err = np.clip(summary.eviction_error_p95, 0.0, 1.0)
    fig.colorbar(
        _heatmap(
            ax, err, "p95 eviction error ||o - o'|| / ||o|| (sink+recent kept)", 0.0, 1.0, "Reds"
        ),
        ax=ax,
    )
    _mark_safe(ax, summary)
    _save(fig, out_dir / "eviction_error.png")
    figures.append(
        Figure(
            "eviction_error.png",
            "95th percentile of the value-aware output error if the head kept only its sink and recent keys. Boxed cells: query heads whose KV head is safe to compress.",
        )
    )

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    codes = np.vectorize(lambda p: PATTERNS.index(p) if p in PATTERNS else len(PATTERNS) - 1)(
        summary.patterns
    )
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cmap = ListedColormap([PATTERN_COLOURS[p] for p in PATTERNS])
    _heatmap(
        ax,
        codes.astype(float),
        "Attention pattern per head",
        -0.5,
        len(PATTERNS) - 0.5,
        cmap,
        fmt="",
    )
    present = [p for p in PATTERNS if (summary.patterns == p).any()]
    ax.legend(
        handles=[Patch(color=PATTERN_COLOURS[p], label=p) for p in present],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    _save(fig, out_dir / "patterns.png")
    figures.append(
        Figure(
            "patterns.png",
            "Pattern of each head (the study's six patterns, or mixed), by majority over the sampled rows.",
        )
    )
    return figures


def _mark_safe(ax: Any, summary: HeadSummary) -> None:
    from matplotlib.patches import Rectangle

    for layer, head in zip(*np.nonzero(summary.safe_query_heads), strict=True):
        ax.add_patch(
            Rectangle(
                (head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#00a0ff", linewidth=1.5
            )
        )


def representative_heads(summary: HeadSummary) -> dict[str, tuple[int, int]]:
    """Return, per pattern present, the (layer, head) that shows it most clearly."""
    s = summary.stats
    score = {
        "uniform": s["normalized_entropy"],
        "v_shaped": np.minimum(s["sink_mass"], s["recent_mass"]),
        "sink": s["sink_mass"],
        "recency": s["recent_mass"],
        "scattered_middle": s["middle_mass"] * s["normalized_entropy"],
        "concentrated_middle": s["middle_mass"] * s["top16_mass"],
        "mixed": s["middle_mass"],
    }
    chosen: dict[str, tuple[int, int]] = {}
    for pattern in PATTERNS:
        mask = summary.patterns == pattern
        if not mask.any():
            continue
        values = np.where(mask, np.nan_to_num(score[pattern], nan=-1.0), -np.inf)
        layer, head = np.unravel_index(int(np.argmax(values)), values.shape)
        chosen[pattern] = (int(layer), int(head))
    return chosen


def _needle_head(
    summary: HeadSummary, rows: dict[int, np.ndarray], prompt: Prompt
) -> tuple[int, int]:
    """Return the concentrated-middle head that puts the most mass on the needle of `prompt`."""
    best, best_mass = (-1, -1), -1.0
    for layer, head in zip(*np.nonzero(summary.patterns == "concentrated_middle"), strict=True):
        mass = float(rows[int(layer)][int(head), prompt.needle_start : prompt.needle_end].sum())
        if mass > best_mass:
            best, best_mass = (int(layer), int(head)), mass
    return best


def pattern_rows(
    summary: HeadSummary, rows: dict[int, np.ndarray], prompt: Prompt, out_dir: Path
) -> list[Figure]:
    """Write, for one head of each pattern, its attention over the positions of `prompt`."""
    plt = _pyplot()
    figures: list[Figure] = []
    chosen = representative_heads(summary)
    if prompt.has_needle and "concentrated_middle" in chosen:
        chosen["concentrated_middle"] = _needle_head(summary, rows, prompt)
    for pattern, (layer, head) in chosen.items():
        p = rows[layer][head]
        n = p.size
        entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        sink = float(p[: summary.sink_tokens].sum())
        recent = float(p[max(0, n - summary.recent_tokens) :].sum())
        fig, ax = plt.subplots(figsize=(9, 3.2))
        # one line per key (a single collection): a lone key stays visible at 2K+ positions
        ax.vlines(np.arange(n), 0.0, p, colors=PATTERN_COLOURS[pattern], linewidth=1.2)
        ax.axvspan(-0.5, summary.sink_tokens - 0.5, color="#2ca02c", alpha=0.15, label="sink")
        ax.axvspan(
            n - summary.recent_tokens - 0.5, n - 0.5, color="#ff7f0e", alpha=0.15, label="recent"
        )
        if prompt.has_needle:
            ax.axvspan(
                prompt.needle_start - 0.5,
                prompt.needle_end - 0.5,
                color="#d62728",
                alpha=0.25,
                label="needle",
            )
        # a margin on both sides: a sink at key 0 or the current token would sit on the frame
        pad = max(2.0, 0.015 * n)
        ax.set_xlim(-pad, n - 1 + pad)
        ax.set_ylim(0, max(float(p.max()) * 1.05, 1e-3))
        ax.set_xlabel("key position (token)")
        ax.set_ylabel("attention probability")
        ax.set_title(
            f"Layer {layer}, head {head}: {pattern}. Entropy = {entropy:.2f} nats; sink {sink:.1%}, recent {recent:.1%}, middle {1 - sink - recent:.1%}",
            fontsize=9,
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
        name = f"attention_{pattern}.png"
        _save(fig, out_dir / name)
        where = (
            f" with the needle fact at tokens {prompt.needle_start}-{prompt.needle_end - 1}"
            if prompt.has_needle
            else ""
        )
        figures.append(
            Figure(
                name,
                f"Attention of the last token of {prompt.name} ({n:,} tokens{where}) for layer {layer}, head {head}, a {pattern.replace('_', ' ')} head.",
            )
        )
    return figures


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
