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


def markdown(safe: Effect, unsafe: Sequence[Effect], total_kv: int, context: str) -> str:
    """Return the validation table (safe vs unsafe heads) as markdown."""

    def cells(label: str, effects: Sequence[Effect]) -> str:
        kl = [e.mean_kl_nats for e in effects]
        ppl = [e.perplexity_change for e in effects]
        ans = [e.answer_nll_change_nats for e in effects]
        rng = (
            (lambda xs, f: f" ({f(min(xs))} to {f(max(xs))})")
            if len(effects) > 1
            else (lambda xs, f: "")
        )
        return (
            f"| {label} | {effects[0].kv_heads} of {total_kv} | {np.mean(kl):.4f}{rng(kl, lambda x: f'{x:.4f}')} "
            f"| {effects[0].perplexity_full:.2f} -> {np.mean([e.perplexity_restricted for e in effects]):.2f} "
            f"| {np.mean(ppl):+.2%}{rng(ppl, lambda x: f'{x:+.2%}')} | {np.nanmean(ans):+.3f} |"
        )

    ratio = np.mean([e.mean_kl_nats for e in unsafe]) / max(safe.mean_kl_nats, 1e-12)
    return "\n".join(
        [
            "| KV heads restricted to sink + recent | KV heads | mean KL, nats/token | perplexity (full -> restricted) | perplexity change | needle answer NLL change, nats |",
            "| --- | --- | --- | --- | --- | --- |",
            cells("marked safe (or chosen, see below)", [safe]),
            cells(
                f"marked unsafe, equal number (mean of {len(unsafe)} random draws, range)", unsafe
            ),
            "",
            f"{context} The unsafe heads' mean KL is {ratio:.1f}x the safe heads'.",
        ]
    )
