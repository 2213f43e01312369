"""The CPU's one-chunk layers of a pass, their top-k and `keys_for_90pct` selected together.

`layer_pass` queues a layer here instead of selecting its keys itself (`HostSelection`), as
`collector.stats.device` queues a device's layers in a `DeviceBatch`; `finish` flushes both.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from collector import topk
from collector.stats.batch import PassBatch
from collector.stats.inputs import RowInputs, StatsSpec


class _Queued(NamedTuple):
    """One layer waiting in a `HostSelection`: its inputs, then the tensors `flush` fills."""

    shifted: torch.Tensor
    weights: torch.Tensor
    high: torch.Tensor
    target: torch.Tensor
    top: torch.Tensor
    solved: torch.Tensor
    keys_needed: torch.Tensor


class HostSelection(PassBatch):
    """The top-k and `keys_for_90pct` of the one-chunk layers of a pass on the CPU, selected together.

    On a few thousand keys per row, inside a serving process, the per-call cost of numpy (one
    partition for the top-k, a few dozen calls for the histogram passes of `topk.select_host`)
    is most of a layer's selection time. Layers queue their shifted logits and weights (views of
    what pass 1 computed) and get tensors that `flush` fills: the layers of one key count share
    one top-k, one solved test and one `topk.select_host` call for the rows the top-k does not
    solve. Memory: the queued layers, at most `budget` bytes, after which the batch selects
    what it holds.

    Usage:
        top, solved, keys_needed = batch.add(shifted, weights, high, target)  # filled by flush
        batch.flush()  # before reading them
    """

    def __init__(self, k: int, goal: float, budget: int) -> None:
        self.k = k
        self.goal = goal
        self.budget = budget
        self.held = 0
        self.pending: list[_Queued] = []

    def add(
        self, shifted: torch.Tensor, weights: torch.Tensor, high: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queue a layer; return its top-k logits (n, kv_heads, group, k), solved and keys_needed
        (n, kv_heads, group, 1), all filled by `flush`.

        shifted: (n, kv_heads, group, keys) logits of one chunk minus the row maximum `high`
        (not clamped: clamped keys would tie); weights: their exp, as pass 1 computed it;
        target: (n, kv_heads, group, 1) in weight units. Rows the top-k solves get a count of 0
        (`finish` reads theirs from the top-k).
        """
        lead = high.shape[:-1]
        top = torch.empty((*lead, min(self.k, shifted.shape[-1])))
        solved = torch.empty(high.shape, dtype=torch.bool)
        keys_needed = torch.zeros(high.shape)
        self.pending.append(_Queued(shifted, weights, high, target, top, solved, keys_needed))
        self.held += shifted.nbytes + weights.nbytes
        if self.held >= self.budget:
            self.flush()
        return top, solved, keys_needed

    def _flush(self) -> None:
        """Select what is queued into the layers' tensors; nothing to do when nothing is queued."""
        by_keys: dict[int, list[_Queued]] = {}
        for layer in self.pending:
            by_keys.setdefault(layer.shifted.shape[-1], []).append(layer)
        self.pending, self.held = [], 0
        for keys, layers in by_keys.items():
            self._select(keys, layers)

    def _select(self, keys: int, layers: list[_Queued]) -> None:
        def rows_of(name: str) -> np.ndarray:
            """The queued layers' tensors of that name as one (rows, width) array (a view for one layer)."""
            parts = [topk.host_view(getattr(layer, name)) for layer in layers]
            rows = [part.reshape(-1, part.shape[-1]) for part in parts]
            return rows[0] if len(rows) == 1 else np.concatenate(rows)

        shifted, weights = rows_of("shifted"), rows_of("weights")
        high, target = rows_of("high"), rows_of("target")
        top = topk.top_values_host(shifted, min(self.k, keys))
        # Rows with NaN weights are not solved and get a meaningless count: they come out as NaN.
        solved = np.exp(top).sum(1, keepdims=True) >= target
        todo = np.flatnonzero(~solved[:, 0])
        counted = np.zeros(solved.shape[0], dtype=np.float32)
        if todo.size:
            every_row = todo.size == solved.shape[0]
            unsolved = (shifted, weights) if every_row else (shifted[todo], weights[todo])
            subset_target = target[todo, 0].astype(np.float64)
            counted[todo] = topk.select_host(lambda _: unsolved, 1, subset_target, keys, self.goal)
        top += high
        start = 0
        for layer in layers:
            stop = start + layer.solved.numel()
            topk.host_view(layer.top).reshape(stop - start, -1)[:] = top[start:stop]
            topk.host_view(layer.solved).reshape(-1)[:] = solved[start:stop, 0]
            topk.host_view(layer.keys_needed).reshape(-1)[:] = counted[start:stop]
            start = stop


def host_selection(rows: RowInputs, goal: float, spec: StatsSpec) -> HostSelection:
    """Return the pass's `HostSelection` (in `rows.scratch`), or one for this layer alone."""
    scratch = {} if rows.scratch is None else rows.scratch
    batch = scratch.get(("host selection",))
    if batch is None:
        batch = scratch[("host selection",)] = HostSelection(
            max(spec.top_k), goal, spec.host_batch_bytes
        )
    return batch
