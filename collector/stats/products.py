"""The two products over every key of a layer: q.k (`Logits`) and p.V (`weighted_values`).

Both are where a layer's time goes on long contexts, and both have shapes that libraries run
slowly as written (a few query rows against tens of thousands of keys): these functions give
them the shapes that run fast, and say what each costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional

from collector import topk
from collector.stats.inputs import RowInputs

# Whether this torch multiplies 16-bit matrices into float32 (`torch.bmm(..., out_dtype=)`, CUDA).
_BMM_TO_FLOAT32 = "dtype" in torch.ops.aten.bmm.overloads()


class Logits:
    """What computes the logits of a key range: queries, keys, bias (masked keys at `MASKED_LOGIT`).

    16-bit keys on a device are multiplied as they are, into float32 (`_mixed_logits`): an
    upcast copy of the keys would cost more than the product (at 64K keys on an H100, 0.39 ms
    against 0.07 ms per layer). Otherwise the float32 query, times the scaling, meets the keys
    upcast to float32.
    """

    def __init__(
        self, rows: RowInputs, scaling: float, bias: torch.Tensor | None, softcap: float | None
    ) -> None:
        self.rows = rows
        self.scaling = scaling
        self.bias = bias  # (n, 1, 1, keys), None when it is zero
        self.softcap = softcap
        self.mixed = (
            _BMM_TO_FLOAT32
            and not topk.on_host(rows.key)
            and rows.key.dtype in (torch.bfloat16, torch.float16)
            and rows.query.dtype == rows.key.dtype
        )
        self._query: torch.Tensor | None = None

    @property
    def query(self) -> torch.Tensor:
        """(n, kv_heads, group, d) float32 queries times the scaling (computed once, on first use)."""
        if self._query is None:
            # Scaling the few query rows instead of the logits saves a pass over the keys.
            self._query = self.rows.query.float() * self.scaling
        return self._query

    @property
    def plain(self) -> bool:
        """Whether the logits are the scaled product alone (no bias, no soft-capping)."""
        return self.bias is None and self.softcap is None

    def unscaled(self, start: int, stop: int) -> torch.Tensor:
        """Return (n, kv_heads, group, stop - start) float32 q.k, not yet times the scaling.

        Only for `plain` logits: the caller scales them (several layers' at once).
        """
        key = gather_keys(self.rows.key, self.rows.batch_index, start, stop)
        if self.mixed:
            return _mixed_logits(self.rows.query, key)
        return torch.matmul(self.rows.query.float(), key.float().transpose(-1, -2))

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """Return (n, kv_heads, group, stop - start) float32 logits as the kernel computes them."""
        if self.mixed:
            logits = self.unscaled(start, stop).mul_(self.scaling)
        else:
            key = gather_keys(self.rows.key, self.rows.batch_index, start, stop)
            logits = torch.matmul(self.query, key.float().transpose(-1, -2))
        if self.softcap is not None:
            logits = torch.tanh(logits.div_(self.softcap)).mul_(self.softcap)
        return logits if self.bias is None else logits.add_(self.bias[..., start:stop])


def _mixed_logits(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Return (n, kv_heads, group, keys) float32 q.k of 16-bit query rows and keys, keys not copied.

    query: (n, kv_heads, group, d); key: (n or 1, kv_heads, keys, d). The keys are the left
    operand (keys x d times d x rows): cuBLAS runs that shape several times faster than rows x
    keys. The result is a transposed view.
    """
    n, kv_heads, group, d = query.shape
    keys = key.shape[2]
    if key.shape[0] == 1:  # every row reads the one batch entry: rows join the group
        # (a view for one row: the dimension of size 1 drops out)
        right = query.permute(1, 3, 0, 2).reshape(kv_heads, d, n * group)
        product = _bmm_float32(key[0], right)  # (kv_heads, keys, n * group)
        return product.view(kv_heads, keys, n, group).permute(2, 0, 3, 1)
    right = query.reshape(n * kv_heads, group, d).transpose(1, 2)
    product = _bmm_float32(key.reshape(n * kv_heads, keys, d), right)
    return product.view(n, kv_heads, keys, group).transpose(-1, -2)


# Device types whose torch has no float32-output product of 16-bit matrices (the CPU; backends
# such as MPS may lack it too): found on first use, then they take float32 copies.
_NO_FLOAT32_OUTPUT: set[str] = set()


def _bmm_float32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Batched product of 16-bit matrices in float32: one kernel where the backend has it, else float32 copies."""
    kind = left.device.type
    if kind not in _NO_FLOAT32_OUTPUT:
        try:
            return torch.bmm(left, right, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError from torch 2.5 on)
            raise
        except RuntimeError:  # NotImplementedError included: no kernel for this backend
            _NO_FLOAT32_OUTPUT.add(kind)
    return torch.bmm(left.float(), right.float())


def gather_keys(t: torch.Tensor, batch_index: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Return (n, kv_heads, stop - start, d): a view when the cache holds one batch entry."""
    if t.shape[0] == 1:
        return t if start == 0 and stop == t.shape[2] else t[:, :, start:stop]
    return t[batch_index, :, start:stop]


# Keys per block of the split p.V product on a device (see `weighted_values`).
SPLIT_KEYS = 1024


def padded_buffer(
    scratch: dict[tuple[object, ...], Any],
    name: str,
    device: torch.device,
    lead: tuple[int, ...] | torch.Size,
    keys: int,
    width: int | None,
) -> torch.Tensor:
    """Return a float32 buffer (*lead, keys rounded up to whole `SPLIT_KEYS` blocks[, width]).

    Zero past `keys`; what is before is the caller's to fill. Kept in `scratch` under its name
    and shape, so that the layers of a pass allocate and zero it once.
    """
    padded = -(-keys // SPLIT_KEYS) * SPLIT_KEYS
    shape = (*lead, padded) if width is None else (*lead, padded, width)
    key = (name, keys, device, *shape)
    buffer = scratch.get(key)
    if buffer is None:
        buffer = torch.empty(shape, dtype=torch.float32, device=device)
        (buffer[..., keys:] if width is None else buffer[..., keys:, :]).zero_()
        scratch[key] = buffer
    return buffer


def weighted_values(
    weights: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return weights @ values (n, kv_heads, group, d) and the values in float32.

    weights: (n, kv_heads, group, keys) float32; values: (n, kv_heads, keys, d), any float dtype.
    On a device the product has a few rows and tens of thousands of keys to sum over: cuBLAS
    runs it on a handful of thread blocks (0.5 ms per layer at 16K keys on an H100, more than
    the rest of the layer). Splitting the keys into blocks of `SPLIT_KEYS` gives it one small
    product per block, summed afterwards. The float32 copy of the values is made with room for
    whole blocks (zeros past the last key), so that the blocks are a view of it. The CPU keeps
    the plain product.
    """
    keys = weights.shape[-1]
    if topk.on_host(weights) or keys < 4 * SPLIT_KEYS:
        values = values.float()
        return torch.matmul(weights, values), values
    padded = -(-keys // SPLIT_KEYS) * SPLIT_KEYS
    upcast = padded_buffer({}, "values", values.device, values.shape[:-2], keys, values.shape[-1])
    upcast[..., :keys, :].copy_(values)
    out = split_product(functional.pad(weights, (0, padded - keys)), upcast)
    return out, upcast[..., :keys, :]


def split_product(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return weights @ values summed over blocks of `SPLIT_KEYS` keys (padded to whole blocks).

    weights: (n, kv_heads, group, keys); values: (n or 1, kv_heads, keys, d), both float32.
    """
    return split_parts(weights, values).sum(-3)


def split_parts(
    weights: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the products of `split_product` per block, (n, kv_heads, blocks, group, d), unsummed.

    out: where to write them, or None for a new tensor (the caller sums them, several layers
    at once).
    """
    blocks = weights.shape[-1] // SPLIT_KEYS
    return torch.matmul(
        weights.unflatten(-1, (blocks, SPLIT_KEYS)).transpose(-2, -3),
        values.unflatten(-2, (blocks, SPLIT_KEYS)),
        out=out,
    )
