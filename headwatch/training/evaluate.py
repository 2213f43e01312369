"""Held-out measurements taken during training: text loss, copy accuracy, needle retrieval.

Usage:
    metrics = evaluate(model, held_maker, device="cpu")   # {"held_loss": ..., ...}
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from headwatch.training.tasks import WindowMaker


def _logits(model: nn.Module, ids: np.ndarray, device: str) -> torch.Tensor:
    x = torch.as_tensor(ids, device=device).unsqueeze(0)
    with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
        out: torch.Tensor = model(input_ids=x).logits[0].float()
    return out


def evaluate(
    model: nn.Module,
    maker: WindowMaker,
    device: str,
    text_windows: int = 6,
    text_length: int = 1024,
    needle_windows: int = 12,
    needle_length: int = 2048,
) -> dict[str, float]:
    """Return held-out text loss, copy accuracy and needle accuracy (exact and per answer token)."""
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(text_windows):
        w = maker.make("text", text_length)
        logits = _logits(model, w.ids, device)
        target = torch.as_tensor(w.ids[1:], device=device)
        losses.append(float(nn.functional.cross_entropy(logits[:-1], target)))
    copy_hits = []
    for _ in range(4):
        w = maker.make("random_repeat", 256)
        pred = _logits(model, w.ids, device).argmax(-1).cpu().numpy()
        scored = w.weights[1:] > 0
        copy_hits.append(float((pred[:-1] == w.ids[1:])[scored].mean()))
    exact, first = [], []
    for i in range(needle_windows):
        # the question ends at several positions: retrieval must not hinge on one of them
        length = max(256, needle_length * (4 - i % 3) // 4)
        w = maker.needle_window(length, n_needles=1, depth=(i + 0.5) / needle_windows)
        pred = _logits(model, w.ids, device).argmax(-1).cpu().numpy()
        a, b = w.answer_start, w.answer_end
        hits = pred[a - 1 : b - 1] == w.ids[a:b]
        exact.append(float(hits.all()))
        first.append(float(hits.mean()))
    model.train(was_training)
    return {
        "held_loss": float(np.mean(losses)),
        "copy_acc": float(np.mean(copy_hits)),
        "needle_exact": float(np.mean(exact)),
        "needle_token_acc": float(np.mean(first)),
    }
