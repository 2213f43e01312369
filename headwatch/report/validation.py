"""The validation table: what restricting safe vs unsafe KV heads to sink+recent did.

Usage:
    print(markdown(safe_effect, unsafe_effects, total_kv_heads, "Model x; 6 prompts."))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Effect:
    """What restricting one set of KV heads did, over all evaluation prompts."""

    label: str
    kv_heads: int
    mean_kl_nats: float
    perplexity_full: float
    perplexity_restricted: float
    answer_nll_change_nats: float

    @property
    def perplexity_change(self) -> float:
        """Return the relative perplexity change (0.01 = +1%)."""
        return self.perplexity_restricted / self.perplexity_full - 1.0


def _mean_and_range(values: Sequence[float], fmt: str) -> str:
    """Return "mean (min to max)" of several values, or the value alone; "n/a" when none is finite."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "n/a"
    text = fmt.format(float(np.mean(finite)))
    if len(finite) > 1:
        text += f" ({fmt.format(min(finite))} to {fmt.format(max(finite))})"
    return text


def markdown(safe: Effect, unsafe: Sequence[Effect], total_kv: int, context: str) -> str:
    """Return the validation table (safe vs unsafe heads) as markdown."""

    def cells(label: str, effects: Sequence[Effect]) -> str:
        restricted = float(np.mean([e.perplexity_restricted for e in effects]))
        return " | ".join(
            [
                f"| {label}",
                f"{effects[0].kv_heads} of {total_kv}",
                _mean_and_range([e.mean_kl_nats for e in effects], "{:.3g}"),
                f"{effects[0].perplexity_full:.2f} -> {restricted:.2f}",
                _mean_and_range([e.perplexity_change for e in effects], "{:+.2%}"),
                _mean_and_range([e.answer_nll_change_nats for e in effects], "{:+.3f}") + " |",
            ]
        )

    unsafe_kl = float(np.mean([e.mean_kl_nats for e in unsafe]))
    larger = sum(e.mean_kl_nats > safe.mean_kl_nats for e in unsafe)
    verdict = (
        f"The unsafe heads' mean KL is {unsafe_kl / safe.mean_kl_nats:.1f}x the safe heads'; "
        if safe.mean_kl_nats > 1e-12
        else f"The safe heads' KL is ~0; the unsafe heads' is {unsafe_kl:.3g}; "
    ) + f"{larger} of {len(unsafe)} unsafe draws changed the distribution more than the safe heads."
    return "\n".join(
        [
            "| KV heads restricted to sink + recent | KV heads | mean KL, nats/token | perplexity (full -> restricted) | perplexity change | needle answer NLL change, nats |",
            "| --- | --- | --- | --- | --- | --- |",
            cells("marked safe (or chosen, see below)", [safe]),
            cells(
                f"marked unsafe, equal number (mean of {len(unsafe)} random draws, range)", unsafe
            ),
            "",
            f"{context} {verdict}",
        ]
    )
