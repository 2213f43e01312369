"""The sink+recent keep-set of a layer (its logits and values) and its largest middle keys."""

from __future__ import annotations

import math

import torch

from collector.stats.inputs import MASKED_LOGIT, RowInputs
from collector.stats.products import Logits


def mask_keep_logits(rows: RowInputs, keep: torch.Tensor) -> torch.Tensor:
    """Return the keep-set's logits with masked keys (finite `MASKED_LOGIT` logits) and padding at -inf."""
    if rows.bias_is_zero and rows.keep_all_valid:
        return keep  # nothing masked, no padding
    hidden = ~rows.keep_valid.reshape(keep.shape[0], 1, 1, -1)
    if not rows.bias_is_zero:
        # after a log-softmax a masked logit is still about MASKED_LOGIT
        hidden = hidden | (keep <= MASKED_LOGIT / 2)
    return keep.masked_fill_(hidden, -math.inf)


def gather_keep_values(rows: RowInputs, values: torch.Tensor) -> torch.Tensor:
    """Return (n, kv_heads, J, d) float32 values of the keep-set; `values` is rows.value or its float32 copy."""
    if rows.keep_index.shape[0] == 1 and values.shape[0] == 1:
        # one op (indexing with a tensor through `values[...]` costs several times the host time)
        keep_values = values.index_select(2, rows.keep_index[0])
    else:
        batch = rows.batch_index[:, None].expand_as(rows.keep_index)
        keep_values = values[batch, :, rows.keep_index].transpose(1, 2)
    return keep_values if keep_values.dtype == torch.float32 else keep_values.float()


def recompute_keep_logits(rows: RowInputs, logits_of: Logits) -> torch.Tensor:
    """Return (n, kv_heads, group, J) keep-set logits, -inf where masked (S + R keys)."""
    index = rows.keep_index
    n = index.shape[0]
    batch = rows.batch_index[:, None].expand_as(index)
    keys = rows.key[batch, :, index].transpose(1, 2).float()  # (n, kv_heads, J, d)
    logits = torch.matmul(logits_of.query, keys.transpose(-1, -2))
    if logits_of.softcap is not None:
        logits = torch.tanh(logits.div_(logits_of.softcap)).mul_(logits_of.softcap)
    bias = torch.gather(rows.bias.float(), 1, index).masked_fill_(~rows.keep_valid, -math.inf)
    return logits.add_(bias.reshape(n, 1, 1, -1))


def largest_middle(
    logits: torch.Tensor,
    rows: RowInputs,
    start: int,
    count: int,
    previous: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, key indices), each (n, kv_heads, group, <= count), of the largest middle keys so far.

    logits: (n, kv_heads, group, width) of keys start..start + width, before any in-place shift.
    Middle keys are those outside the sink+recent keep-set; masked ones are dropped by the caller.
    """
    width = logits.shape[-1]
    local = rows.keep_index - start
    inside = rows.keep_valid & (local >= 0) & (local < width)
    # A count per key: padding entries of the keep-set add 0 wherever they point.
    kept = torch.zeros(local.shape[0], width, dtype=torch.int32, device=logits.device)
    kept.scatter_add_(1, local.clamp(0, width - 1), inside.to(torch.int32))
    candidates = logits.masked_fill(kept.bool()[:, None, None, :], -math.inf)
    values, index = candidates.topk(min(count, width), dim=-1)
    index = index + start
    if previous is not None:
        merged = torch.cat([previous[0], values], -1)
        values, order = merged.topk(min(count, merged.shape[-1]), dim=-1)
        index = torch.cat([previous[1], index], -1).gather(-1, order)
    return values, index


def middle_indices(middle: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """Indices of the largest middle keys, -1 where masked (those, and the -inf fill, are not middle keys)."""
    if middle is None:
        return None
    return middle[1].masked_fill_(middle[0] <= MASKED_LOGIT / 2, -1)
