"""`layer_pass`: one layer's keys and values, read once per chunk; `row_statistics` for one layer.

Layers whose keys fit one chunk on a device take `collector.stats.device.device_pass`; every
other layer (more chunks, learned sink logits, the CPU) takes the general path here.
"""

from __future__ import annotations

import torch

from collector import topk
from collector.stats.device import device_pass
from collector.stats.finish import finish
from collector.stats.host import host_selection
from collector.stats.inputs import (
    EXP_FLOOR,
    MASKED_LOGIT,
    MASS_SLACK,
    LayerPartial,
    RowInputs,
    StatsSpec,
    visible_keys,
)
from collector.stats.keepset import (
    gather_keep_values,
    largest_middle,
    mask_keep_logits,
    middle_indices,
    recompute_keep_logits,
)
from collector.stats.products import Logits, gather_keys, weighted_values
from collector.topk import keys_for_target, top_values


def chunk_bounds(keys: int, chunk_keys: int) -> list[tuple[int, int]]:
    """Return [start, stop) ranges of `chunk_keys` keys, the remainder first.

    A remainder of less than an eighth of a chunk joins the first chunk instead (which then holds
    up to 1.125 x `chunk_keys` keys): a chunk costs the same fixed number of operations whatever
    its length, so a 64K context plus the decoded token is one chunk, not two.
    """
    count = max(1, -(-keys // chunk_keys))
    if count > 1 and keys - (count - 1) * chunk_keys < chunk_keys // 8:
        count -= 1
    first = keys - (count - 1) * chunk_keys
    return [(0, first)] + [
        (first + i * chunk_keys, first + (i + 1) * chunk_keys) for i in range(count - 1)
    ]


def row_statistics(
    rows: RowInputs, scaling: float, spec: StatsSpec, softcap: float | None = None
) -> dict[str, torch.Tensor]:
    """Return per-(row, query head) statistics as float32 tensors (n, heads), plus `visible_keys` (n,).

    Rows with no visible key, or with non-finite logits, come out as NaN (flagged upstream).
    """
    return finish([layer_pass(rows, scaling, spec, softcap)], spec)[0]


def layer_pass(
    rows: RowInputs, scaling: float, spec: StatsSpec, softcap: float | None = None
) -> LayerPartial:
    """Read one layer's keys and values (the expensive part); `finish` does the rest for all layers at once."""
    n, kv_heads, group, _ = rows.query.shape
    total_keys = rows.key.shape[2]
    kmax = min(max(spec.top_k), total_keys)
    bias = (
        None if rows.bias_is_zero else rows.bias.float().clamp(min=MASKED_LOGIT)[:, None, None, :]
    )
    logits_of = Logits(rows, scaling, bias, softcap)
    bounds = chunk_bounds(total_keys, spec.chunk_keys)
    if len(bounds) == 1 and rows.sinks is None and not topk.on_host(rows.query):
        return device_pass(rows, logits_of, spec)
    # One chunk on the CPU: the top-k and keys_for_90pct are selected with the pass's other
    # one-chunk layers (`collector.stats.host.HostSelection`).
    host_chunk = len(bounds) == 1 and topk.on_host(rows.query)
    # set by chunk 0 (chunk_top by `top_values`, except on the one-chunk CPU path)
    high = total = entropy_sum = out = top = chunk_top = shifted = weights = rows.query
    values = rows.value
    keep_raw = None
    middle: tuple[torch.Tensor, torch.Tensor] | None = None
    for i, (start, stop) in enumerate(bounds):
        logits = logits_of(start, stop)
        if spec.middle_keys:
            middle = largest_middle(logits, rows, start, spec.middle_keys, middle)
        if len(bounds) == 1:  # the keep-set's logits, read before they are shifted in place
            index = rows.keep_index.reshape(n, 1, 1, -1).expand(n, kv_heads, group, -1)
            keep_raw = logits.gather(-1, index)
        if not host_chunk:
            chunk_top = top_values(logits, min(kmax, stop - start))
        chunk_max = logits.amax(-1, keepdim=True)
        new_high = chunk_max if i == 0 else torch.maximum(high, chunk_max)
        # In place: the raw logits are not needed again. The top-k reads them unclamped: keys
        # clamped alike would tie, which slows numpy's partition.
        shifted = logits.sub_(new_high)
        clamped = shifted.clamp(min=EXP_FLOOR)
        weights = torch.exp(clamped)
        chunk_sum = weights.sum(-1, keepdim=True)
        chunk_entropy = torch.linalg.vecdot(weights, clamped)[..., None]
        chunk_out = out  # the kernel's output, when given, stands in for p.V (set after the loop)
        if rows.output is None:
            values = gather_keys(rows.value, rows.batch_index, start, stop)
            chunk_out, values = weighted_values(weights, values)
        if i == 0:
            total, entropy_sum, out, top = chunk_sum, chunk_entropy, chunk_out, chunk_top
        else:
            # Rescale to the new maximum: e' = e * r, e' log e' = r (e log e + d e), d = log r.
            shift = high - new_high
            rescale = torch.exp(shift)
            entropy_sum = rescale * (entropy_sum + shift * total) + chunk_entropy
            total = rescale * total + chunk_sum
            if rows.output is None:
                out = rescale * out + chunk_out
            merged = torch.cat([top, chunk_top], dim=-1)
            top = merged.topk(min(kmax, merged.shape[-1]), dim=-1, sorted=False).values
        high = new_high
    atom = None
    if rows.sinks is not None:
        atom = torch.exp(rows.sinks.float().reshape(1, kv_heads, group, 1) - high)
        total = total + atom
        entropy_sum = entropy_sum + torch.special.xlogy(atom, atom)
    visible = visible_keys(rows)
    goal = spec.mass_target * (1 - MASS_SLACK)
    target = total * goal if atom is None else (total - atom).mul_(goal)
    keys_needed = None
    batch = None
    if host_chunk:
        batch = host_selection(rows, goal, spec)
        top, solved, keys_needed = batch.add(shifted, weights, high, target)
    else:
        # Does the top-k hold the mass target? (a host sync, on measured rows only)
        # Rows with NaN weights are not solved and get a meaningless count: they come out as NaN.
        solved = torch.exp(top - high).sum(-1, keepdim=True) >= target
        if not bool(solved.all()):
            # Recomputed chunks are shifted as above and clamped as the weights were (the
            # histogram puts every key below its band in one bin, clamped or not).
            keys_needed = keys_for_target(
                lambda start, stop: logits_of(start, stop).sub_(high).clamp_(min=EXP_FLOOR),
                bounds, target, (shifted, weights), solved, goal,
            )  # fmt: skip
    if keep_raw is None:
        keep_logits = recompute_keep_logits(rows, logits_of)
    else:
        keep_logits = mask_keep_logits(rows, keep_raw)
    if len(bounds) > 1 or rows.output is not None or rows.value.shape[0] > 1:
        values = rows.value  # else: the one chunk's float32 values, all batch entries
    if rows.output is not None:  # the kernel's output: already divided by the total
        out = rows.output
    return LayerPartial(
        high, total, entropy_sum, atom, out, top, keep_logits, gather_keep_values(rows, values),
        rows.keep_is_sink, visible, solved, keys_needed, rows.output is not None,
        middle_index=middle_indices(middle), batch=batch,
    )  # fmt: skip
