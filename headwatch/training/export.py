"""Write a trained model as the bundled checkpoint: fp16 safetensors, config, tokenizer, curve.

Usage:
    export_model(model, tokenizer, Path("headwatch/model"), context=2048, curve_csv=run_dir / "curve.csv")
"""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from headwatch.training.tokenizer import save_tokenizer

logger = logging.getLogger(__name__)


def read_curve(curve_csv: Path) -> list[dict[str, float]]:
    """Return the rows of a run's loss-curve CSV as floats (empty cells are NaN)."""
    if not curve_csv.is_file():
        return []
    with curve_csv.open() as f:
        return [
            {k: float(v) if v else float("nan") for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def plot_curve(rows: list[dict[str, float]], out_png: Path) -> None:
    """Draw training and held-out loss and the retrieval accuracies against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] / 1e6 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(tokens, [r["train_loss"] for r in rows], label="train loss (weighted)", lw=0.8)
    held = [
        (t, r["held_loss"])
        for t, r in zip(tokens, rows, strict=True)
        if r["held_loss"] == r["held_loss"]
    ]
    if held:
        ax1.plot(*zip(*held, strict=True), "o-", label="held-out text loss")
    ax1.set_xlabel("tokens seen (millions)")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax1.legend()
    for key, label in (
        ("copy_acc", "copy accuracy (repeated random tokens)"),
        ("needle_exact", "needle retrieval, exact (1-2K context)"),
        ("needle_token_acc", "needle retrieval, per answer token"),
    ):
        pts = [
            (t, r[key]) for t, r in zip(tokens, rows, strict=True) if key in r and r[key] == r[key]
        ]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", label=label)
    ax2.set_xlabel("tokens seen (millions)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def export_model(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    out_dir: Path,
    context: int,
    curve_csv: Path,
    summary: dict[str, Any],
) -> None:
    """Save `model` in fp16 with its tokenizer, loss curve (CSV + PNG) and a training summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).cpu().half()
    half.config.dtype = torch.float16
    half.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir, model_max_length=context)
    rows = read_curve(curve_csv)
    if rows:
        (out_dir / "loss_curve.csv").write_text(curve_csv.read_text())
        plot_curve(rows, out_dir / "loss_curve.png")
    (out_dir / "training_summary.json").write_text(
        json.dumps(summary, indent=2, sort_keys=True) + "\n"
    )
    logger.info("exported the model to %s", out_dir)
