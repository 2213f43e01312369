"""The last query row's attention probabilities of every head, computed eagerly on the side.

Usage:
    rows = last_row_attention(model, input_ids)   # {layer: (num_query_heads, keys) float32 array}

For the report's figures only (research use): it runs one extra forward pass through a
registered attention function that returns the sdpa output unchanged and, on the side,
recomputes softmax(q k^T * scaling) of the last query row with the module's own scaling,
soft-cap and sliding window. The production path (the collector) never materialises rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_NAME = "headwatch_last_row"


def causal_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Return sdpa's output (batch, queries, heads, dim) for one unpadded causal sequence.

    `attn_mask` is an optional boolean (heads, queries, keys) mask of allowed keys; without it
    the plain causal mask applies. Shapes: query (batch, heads, queries, dim), key/value
    (batch, kv_heads, keys, dim).
    """
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    if attn_mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling
        )
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask.unsqueeze(0), scale=scaling
        )
    return out.transpose(1, 2).contiguous()


def _row_probs(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """Return (heads, keys) probabilities of the last query row of batch item 0."""
    group = query.shape[1] // key.shape[1]
    q = query[0, :, -1, :].float()  # (heads, dim)
    k = key[0].float().repeat_interleave(group, dim=0)  # (heads, keys, dim)
    scaling = kwargs.get("scaling") or getattr(module, "scaling", q.shape[-1] ** -0.5)
    scores = torch.einsum("hd,hkd->hk", q, k) * float(scaling)
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    window = kwargs.get("sliding_window")
    if window:
        scores[:, : max(0, scores.shape[1] - int(window))] = float("-inf")
    return torch.softmax(scores, dim=-1)


@contextmanager
def _capture(model: PreTrainedModel, rows: dict[int, np.ndarray]) -> Iterator[None]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        layer = int(getattr(module, "layer_idx", len(rows)))
        rows[layer] = _row_probs(module, query, key, kwargs).cpu().numpy()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_NAME, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def last_row_attention(model: PreTrainedModel, input_ids: torch.Tensor) -> dict[int, np.ndarray]:
    """Return {layer: (num_query_heads, keys)} attention of the last token of one sequence."""
    rows: dict[int, np.ndarray] = {}
    with _capture(model, rows):
        model(input_ids=input_ids[:1], use_cache=False)
    return rows
