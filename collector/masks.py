"""4-D attention masks: the padding mask of a measured pass when the caller gave no 2-D one.

Usage:
    mask = padding_mask(kwargs.get("attention_mask"))      # 2-D, 4-D, or None; ValueError otherwise
    rows, unseen = padding_rows(mask, chosen, past_slots, query_len, position_ids)  # 4-D masks

`generate()` with a static cache passes the model a 4-D mask (a dict of them by layer type for
models with several), and callers may build their own. Read on measured passes only: reading a
mask on the device syncs with the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from collector.plan import key_offset, on_device


def padding_mask(mask: Any) -> torch.Tensor | None:
    """Return the mask of a forward call that shows padding: 2-D (batch, slots) 0/1, 4-D as the
    kernels take it, or None when there is none (no padding); raise ValueError for other forms.

    `generate()` with a static cache passes a 4-D mask, or for models with several layer types
    (`config.layer_types`) a dict of them by type; the full-attention one hides no real token.
    """
    if isinstance(mask, dict):
        tensors = [m for m in mask.values() if m is not None]
        mask = mask.get("full_attention", tensors[0] if tensors else None)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"expected a 2-D or 4-D attention mask, got {shape}")
    return mask


def padding_rows(
    mask: torch.Tensor,
    batch_indices: list[int],
    past_slots: int,
    query_len: int,
    position_ids: torch.Tensor | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Return the chosen sequences' 0/1 real-slot rows (n, total_slots) and unseen token counts,
    read from a 4-D mask (host syncs: call it on measured passes only).

    mask: (batch or 1, heads or 1, query_len, keys), boolean (True: visible) or additive float
    (0 or a bias: visible; -inf or the dtype's large negative value: masked), as transformers
    builds it for a static cache or takes it from the caller; keys map to slots as in
    `key_offset`. The measured row is the last query row that sees its own slot (padding rows see
    nothing), and the keys it sees are the real slots up to it. A sliding window hides real
    tokens from it too, and a window-sized cache holds no slot before `total_slots - keys`: then
    the real tokens it does not see (`unseen`, all before the first one it sees) are counted from
    its `position_ids` (batch or 1, query_len), and without them the mask raises ValueError.
    """
    total = past_slots + query_len
    offset = key_offset(total, mask.shape[-1]) if mask.dim() == 4 else 0
    if mask.dim() != 4 or mask.shape[2] != query_len or past_slots < offset:
        raise ValueError(
            f"expected a 4-D attention mask over {query_len} query rows and at least {query_len} "
            f"keys, got shape {tuple(mask.shape)}"
        )
    if mask.shape[0] != 1 and max(batch_indices) >= mask.shape[0]:
        raise ValueError(
            f"expected a 4-D attention mask over {max(batch_indices) + 1} or more sequences, "
            f"got shape {tuple(mask.shape)}"
        )
    device = mask.device
    sequences = on_device([b if mask.shape[0] != 1 else 0 for b in batch_indices], device)
    query_rows = torch.arange(query_len, device=device)
    # Whether each query row sees its own slot (n, query_len), and the last one that does.
    own = _is_visible(mask[sequences[:, None], 0, query_rows, query_rows + past_slots - offset])
    last = (own * (query_rows + 1)).argmax(-1)
    seen = _is_visible(mask[sequences, 0, last])[:, : total - offset]
    own_host, seen_host, last_host = own.cpu().numpy(), seen.cpu().numpy(), last.cpu().numpy()
    query_positions = None
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[1] == query_len:
        picked = sequences if position_ids.shape[0] != 1 else torch.zeros_like(sequences)
        query_positions = position_ids[picked, last].cpu().numpy()
    rows = np.zeros((len(batch_indices), total), dtype=np.int8)
    unseen = [0] * len(batch_indices)
    for i in range(len(batch_indices)):
        if not own_host[i].any():
            continue  # no real query row: plan_rows skips the sequence
        query_slot = past_slots + int(last_host[i])
        real = np.zeros(total, dtype=bool)
        real[offset : query_slot + 1] = seen_host[i][: query_slot + 1 - offset]
        rows[i] = real
        # A row of the block that sees itself but that the query does not see: hidden by a window.
        hidden = own_host[i] & ~seen_host[i][past_slots - offset :]
        # Slots before the query it does not see are padding or hidden by a window; position_ids
        # tell which (for padding they give 0 unseen tokens). Without them, and with nothing
        # that must be a window, they are taken as padding.
        gaps = not real[offset : query_slot + 1].all()
        if offset == 0 and not hidden.any() and (query_positions is None or not gaps):
            continue
        if query_positions is None:
            raise ValueError(
                f"expected position_ids with a 4-D attention mask of shape {tuple(mask.shape)} "
                "that hides real tokens from the query (a sliding window), got none"
            )
        unseen[i] = int(query_positions[i]) + 1 - int(real.sum())
        if unseen[i] < 0:
            raise ValueError(
                f"expected a query position of at least {int(real.sum()) - 1} in position_ids, "
                f"got {int(query_positions[i])}"
            )
    return rows, unseen


def _is_visible(mask: torch.Tensor) -> torch.Tensor:
    """Return where a boolean or additive float mask lets attention through."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"expected a boolean or floating-point attention mask, got {mask.dtype}")
    # The threshold `_bias_rows` uses: masked entries are -inf or the dtype's minimum value.
    return mask > torch.finfo(mask.dtype).min / 2
