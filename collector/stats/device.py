"""`device_pass`: one layer's statistics on a device, keys in one chunk: about 17 kernels, no host sync."""

from __future__ import annotations

import torch

from collector.stats.inputs import MASS_SLACK, LayerPartial, RowInputs, StatsSpec, visible_keys
from collector.stats.keepset import (
    gather_keep_values,
    largest_middle,
    mask_keep_logits,
    middle_indices,
)
from collector.stats.products import Logits, gather_keys, padded_buffer, split_product


def device_pass(rows: RowInputs, logits_of: Logits, spec: StatsSpec) -> LayerPartial:
    """`layer_pass` of one chunk on a device, without learned sinks: about 17 kernels, no host sync.

    A serving process launches these kernels one by one from Python, so their number sets the
    cost (on an H100 the launch, not the arithmetic, is most of a layer's time up to 16K keys).
    Log-probabilities come from one fused log-softmax, so that everything is relative to the
    log-sum-exp: `high` is 0 and `total` is 1 (their sum differs from 1 by float32 rounding,
    1e-7; a row whose logits are not finite has a NaN entropy, and `finish` flags it). One sort
    of the probabilities gives the top-k and `keys_for_90pct` (`sorted_counts`). Buffers
    padded to whole blocks of keys, constants and index views are shared by the layers of a
    pass (`RowInputs.scratch`). Extra memory, as on the general path with one chunk: a few
    (n, h, keys) tensors (log-probabilities, probabilities, their sort and float64 running sum)
    and the float32 copy of the values, (kv_heads, keys, d), the only one the size of the cache.
    """
    n, kv_heads, group, _ = rows.query.shape
    keys = rows.key.shape[2]
    scratch = {} if rows.scratch is None else rows.scratch
    logits = logits_of(0, keys)
    middle = largest_middle(logits, rows, 0, spec.middle_keys, None) if spec.middle_keys else None
    log_p = torch.log_softmax(logits, dim=-1)
    # the keep-set's index per head (one per key count in a pass), a maximum of 0, a total of 1
    name = ("shared", keys, log_p.device, n, kv_heads, group)
    shared = scratch.get(name)
    if shared is None:
        shared = scratch[name] = (
            rows.keep_index.reshape(n, 1, 1, -1).expand(n, kv_heads, group, -1),
            log_p.new_zeros((n, kv_heads, group, 1)),
            log_p.new_ones((n, kv_heads, group, 1)),
        )
    index, zero, one = shared
    keep_logits = mask_keep_logits(rows, log_p.gather(-1, index))
    padded = padded_buffer(scratch, "probabilities", log_p.device, (n, kv_heads, group), keys, None)
    weights = torch.exp(log_p, out=padded[..., :keys])
    entropy_sum = torch.linalg.vecdot(weights, log_p)[..., None]
    values = rows.value
    if rows.output is not None:
        out = rows.output
    else:
        value = gather_keys(rows.value, rows.batch_index, 0, keys)
        upcast = padded_buffer(
            scratch, "values", log_p.device, value.shape[:2], keys, value.shape[-1]
        )
        values = upcast[..., :keys, :].copy_(value)
        out = split_product(padded, upcast)
        if rows.value.shape[0] > 1:
            values = rows.value  # the copy holds the rows' entries, not the batch's
    goal = spec.mass_target * (1 - MASS_SLACK)
    top, keys_needed = sorted_counts(weights, min(max(spec.top_k), keys), goal)
    visible = visible_keys(rows)
    return LayerPartial(
        zero, one, entropy_sum, None, out, top, keep_logits, gather_keep_values(rows, values),
        rows.keep_is_sink, visible, None, keys_needed, rows.output is not None,
        counted_by_sort=True, middle_index=middle_indices(middle),
    )  # fmt: skip


def sorted_counts(weights: torch.Tensor, k: int, goal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the k largest weights and how many keys come before the one reaching `goal` of the mass.

    weights: (n, kv_heads, group, keys) probabilities of one chunk, on a device. A device sorts a
    few rows of 64K keys in a fraction of a millisecond with no host sync, where the histogram
    passes of `keys_for_target` take tens of small operations and several syncs. The running sum
    is float64 and the target is taken from its own last entry (times `goal` < 1), so exact ties
    (e.g. 900 of 1000 equal keys) count exactly and the count never passes the last key. NaN
    sorts first; such rows are flagged. Both results are copies (a view would keep the sorted
    rows alive until `finish`, which turns them into logits and counts for all layers at once:
    `LayerPartial.counted_by_sort`).
    """
    ordered = weights.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1, dtype=torch.float64)
    # the keys before the first running sum that reaches the target
    before = torch.searchsorted(cumulative, cumulative[..., -1:] * goal)
    return ordered[..., :k].clone(), before
