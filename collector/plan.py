"""Host-side plan of a measured pass, and the per-layer tensors the statistics need.

Usage:
    rows = plan_rows(mask_rows, batch_indices, query_len, phase, sink_tokens, recent_tokens, unseen)
    inputs = layer_inputs(plan, query, key, value, attention_mask, sliding_window, is_causal, sinks)

Pure numpy and torch. A "slot" is an index into the padded sequence (cache positions, padding
included); a "position" is the absolute token index of a real token (padding excluded). Keys of a
layer map to slots by `slot = key_index + (total_slots - keys)` when the layer's cache keeps a
suffix (sliding-window layers), and `slot = key_index` when it is longer (a static cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from collector.stats import LayerPartial, RowInputs

Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class RowPlan:
    """One measured (sequence, query position)."""

    batch_index: int
    query_row: int  # index into the pass's query dimension
    query_slot: int
    query_position: int
    positions: np.ndarray  # (total_slots,) absolute position of each slot, -1 for padding
    sink_slots: np.ndarray
    recent_slots: np.ndarray


@dataclass
class PassPlan:
    """Everything a measured pass needs, decided on the host before the first layer runs."""

    phase: Phase
    total_slots: int
    query_len: int
    rows: list[RowPlan]
    partials: dict[int, LayerPartial] = field(default_factory=dict)
    results: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    # The same statistics as one tensor when every layer was finished together: the layers,
    # (layers, n, heads, stats) in core_stat_names order, and the visible keys (layers, n).
    stacked: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
    layout: dict[str, int] = field(default_factory=dict)
    key_counts: dict[int, int] = field(default_factory=dict)  # layer -> keys its kernel read
    stats_seconds: float = 0.0
    attention_calls: int = 0  # wrapped attention calls the pass made, measured or not
    _keep_cache: dict[
        tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]
    ] = field(default_factory=dict)
    # Layers that share key count, window and mask share their bias rows: built once per pass.
    _bias_cache: dict[tuple[object, ...], tuple[object, torch.Tensor, torch.Tensor, bool]] = field(
        default_factory=dict
    )
    _index_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )
    # Buffers the statistics of the layers share (`collector.stats.RowInputs.scratch`); they go
    # with the plan at the end of the pass.
    _scratch: dict[tuple[object, ...], Any] = field(default_factory=dict)


def plan_rows(
    mask_rows: np.ndarray,
    batch_indices: list[int],
    query_len: int,
    phase: Phase,
    sink_tokens: int,
    recent_tokens: int,
    unseen_tokens: list[int] | None = None,
) -> list[RowPlan]:
    """Return the row plans: the last real token of each sequence's current block.

    mask_rows: (len(batch_indices), total_slots) 0/1 padding mask of the chosen sequences.
    unseen_tokens: per row, the real tokens that come before its first real slot but that its
    mask row does not show (see `collector.masks.padding_rows`); none when absent.
    """
    total = mask_rows.shape[1]
    plans: list[RowPlan] = []
    unseen_counts = unseen_tokens if unseen_tokens is not None else [0] * len(batch_indices)
    for b, mask, unseen in zip(batch_indices, mask_rows, unseen_counts, strict=True):
        if unseen == 0 and mask.all():  # no padding: slots are positions (the common case)
            slot = total - 1
            sink = np.arange(min(sink_tokens, total))
            recent = np.arange(max(sink_tokens, total - recent_tokens), total)
            plans.append(RowPlan(b, query_len - 1, slot, slot, np.arange(total), sink, recent))
            continue
        real = mask.astype(bool)
        block = np.flatnonzero(real[total - query_len :])
        if block.size == 0:
            continue
        slot = total - query_len + int(block[-1])
        positions = np.where(real, np.cumsum(real) - 1 + unseen, -1)
        qpos = int(positions[slot])
        sink = np.flatnonzero(real & (positions < sink_tokens) & (np.arange(total) <= slot))
        recent = np.flatnonzero(
            real
            & (positions > qpos - recent_tokens)
            & (positions >= sink_tokens)
            & (positions <= qpos)
        )
        plans.append(RowPlan(b, slot - (total - query_len), slot, qpos, positions, sink, recent))
    return plans


def on_device(values: np.ndarray | list[int], device: torch.device) -> torch.Tensor:
    """Return host values as a tensor on `device`, without a host sync on a CUDA device.

    `torch.tensor(values, device="cuda")` copies from pageable memory and waits for the stream
    (every kernel queued so far) to finish; a copy from pinned memory is queued instead, and
    the pinned buffer is kept until it has run.
    """
    host = torch.as_tensor(values)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def key_offset(total_slots: int, keys: int) -> int:
    """Return the slot of key 0: caches shorter than the sequence keep its suffix."""
    return total_slots - keys if keys < total_slots else 0


def _row_indices(plan: PassPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the batch entry and the query row of each planned row, (n,) long on `device`
    (copied once per pass and device)."""
    indices = plan._index_cache.get(device)
    if indices is None:
        indices = (
            on_device([r.batch_index for r in plan.rows], device),
            on_device([r.query_row for r in plan.rows], device),
        )
        plan._index_cache[device] = indices
    return indices


def _bias_rows(
    plan: PassPlan,
    keys: int,
    mask: torch.Tensor | None,
    sliding_window: int | None,
    is_causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Return (n, keys) float32: 0 (or the model's additive bias) where visible, -inf elsewhere."""
    n = len(plan.rows)
    batch, rows = _row_indices(plan, device)
    if mask is not None and mask.dim() == 4:
        if mask.shape[-1] < keys:
            raise ValueError(f"expected a mask over {keys} keys, got {tuple(mask.shape)}")
        heads = mask[:, 0] if mask.shape[1] >= 1 else mask
        picked = heads[batch if mask.shape[0] > 1 else torch.zeros_like(batch), rows, :keys]
        if picked.dtype == torch.bool:
            return torch.zeros(picked.shape, device=device).masked_fill(~picked, -math.inf)
        floor = torch.finfo(picked.dtype).min / 2
        return picked.float().masked_fill(picked <= floor, -math.inf)
    offset = key_offset(plan.total_slots, keys)
    slots = torch.arange(keys, device=device) + offset
    query_slots = on_device([r.query_slot for r in plan.rows], device)[:, None]
    visible = (slots[None, :] < plan.total_slots).expand(n, keys).clone()
    if is_causal:
        visible &= slots[None, :] <= query_slots
    if sliding_window is not None:
        visible &= query_slots - slots[None, :] < sliding_window
    if mask is not None and mask.dim() == 2:
        visible &= mask[batch][:, -keys:].bool() if mask.shape[-1] >= keys else visible
    return torch.zeros((n, keys), device=device).masked_fill(~visible, -math.inf)


def _sees_every_key(plan: PassPlan, keys: int, sliding_window: int | None) -> bool:
    """Whether every row sees all `keys` keys when no mask is given: each query is at or after
    the last key's slot, and within the sliding window of the first."""
    offset = key_offset(plan.total_slots, keys)
    if offset + keys > plan.total_slots:  # a static cache: slots past the sequence are empty
        return False
    for row in plan.rows:
        if row.query_slot < offset + keys - 1:
            return False
        if sliding_window is not None and row.query_slot - offset >= sliding_window:
            return False
    return True


def _keep_rows(
    plan: PassPlan, keys: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Return keep_index, keep_is_sink, keep_valid (n, J) for this layer's key count, and whether all are valid."""
    cached = plan._keep_cache.get((keys, 0, device))
    if cached is not None:
        return cached
    offset = key_offset(plan.total_slots, keys)
    per_row = []
    for row in plan.rows:
        sink = row.sink_slots - offset
        recent = row.recent_slots - offset
        sink = sink[(sink >= 0) & (sink < keys)]
        recent = recent[(recent >= 0) & (recent < keys)]
        per_row.append((np.concatenate([sink, recent]), sink.size))
    width = max(1, max(idx.size for idx, _ in per_row))
    index_np = np.zeros((len(per_row), width), dtype=np.int64)
    is_sink_np = np.zeros((len(per_row), width), dtype=bool)
    valid_np = np.zeros((len(per_row), width), dtype=bool)
    for i, (idx, n_sink) in enumerate(per_row):
        index_np[i, : idx.size] = idx
        is_sink_np[i, :n_sink] = True
        valid_np[i, : idx.size] = True
    result = (
        on_device(index_np, device),
        on_device(is_sink_np, device),
        on_device(valid_np, device),
        bool(valid_np.all()),
    )
    plan._keep_cache[(keys, 0, device)] = result
    return result


def layer_inputs(
    plan: PassPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    sliding_window: int | None,
    is_causal: bool,
    sinks: torch.Tensor | None,
    output: torch.Tensor | None = None,
) -> RowInputs:
    """Return the statistics inputs of one attention call for the plan's rows.

    query: (batch, heads, q, d); key, value: (batch, kv_heads, keys, d); mask as the kernel got it;
    output: what the kernel returned, (batch, q, heads, d), used when it is float32.
    """
    device = query.device
    batch, rows = _row_indices(plan, device)
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(
            f"expected query heads to be a multiple of {kv_heads} KV heads, got {heads}"
        )
    if len(plan.rows) == 1:  # a view, no gather
        picked = query[plan.rows[0].batch_index, :, plan.rows[0].query_row][None]
    elif query.shape[0] > 1:
        picked = query[batch, :, rows]
    else:
        picked = query[0, :, rows].transpose(0, 1)
    picked = picked.reshape(len(plan.rows), kv_heads, heads // kv_heads, query.shape[-1])
    row_output = None
    b, q, d = query.shape[0], query.shape[2], query.shape[3]
    # A float32 kernel output is the attention output itself: the statistics need not recompute
    # p.V. In lower precision it is rounded, so it is recomputed in float32 instead.
    if output is not None and output.dtype == torch.float32 and output.shape == (b, q, heads, d):
        if len(plan.rows) == 1:
            row_output = output[plan.rows[0].batch_index, plan.rows[0].query_row][None]
        else:
            row_output = output[batch, rows]
        row_output = row_output.reshape(picked.shape)
    keys = key.shape[2]
    keep_index, keep_is_sink, keep_valid, keep_all_valid = _keep_rows(plan, keys, device)
    cache_key = (keys, sliding_window, is_causal, None if mask is None else id(mask), device)
    cached = plan._bias_cache.get(cache_key)
    if cached is None and mask is None and _sees_every_key(plan, keys, sliding_window):
        # The common decode step: nothing masked, no tensor to inspect (and no host sync).
        visible = torch.full((len(plan.rows),), keys, device=device)
        cached = (None, torch.zeros((len(plan.rows), keys), device=device), visible, True)
        plan._bias_cache[cache_key] = cached
    if cached is None:
        bias = _bias_rows(plan, keys, mask, sliding_window, is_causal, device)
        # The mask is kept with its entry so that its id cannot be reused within the pass. A host
        # sync, once per pass and mask: a bias of zeros (nothing masked) is skipped by the statistics.
        cached = (mask, bias, (bias > -math.inf).sum(-1), not bool(bias.any()))
        plan._bias_cache[cache_key] = cached
    return RowInputs(
        query=picked,
        key=key,
        value=value,
        batch_index=batch,
        bias=cached[1],
        keep_index=keep_index,
        keep_is_sink=keep_is_sink,
        keep_valid=keep_valid,
        sinks=sinks,
        visible=cached[2],
        bias_is_zero=cached[3],
        output=row_output,
        keep_all_valid=keep_all_valid,
        scratch=plan._scratch,
    )
