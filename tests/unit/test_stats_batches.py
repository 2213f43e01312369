"""Layers of a pass finished in batches: the device's `DeviceBatch` and the CPU's `HostSelection`.

Each test runs on the numpy (CPU) and the torch (GPU) path (the stats_path fixture); the rows,
the float64 reference and the comparison are those of `test_stats_layers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from collector import topk
from collector.stats import RowInputs, StatsSpec, device, finish, layer_pass
from collector.stats.inputs import stack
from tests.unit.test_stats_layers import MIXED, assert_matches, direct, make_rows, to_16bit

pytestmark = pytest.mark.usefixtures("stats_path")


def sorts_in(run: Callable[[], object]) -> int:
    """How many sorts (aten.sort) `run` calls."""

    class Count(TorchDispatchMode):
        sorts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket is torch.ops.aten.sort:
                Count.sorts += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.sorts


def test_a_batch_of_layers_with_their_own_scalings(stats_path: str) -> None:
    """Plain logits (no bias, no soft-capping) are scaled in their batch: once when its layers
    share the scaling, layer by layer when they do not, never twice."""
    shared: dict[tuple[object, ...], object] = {}

    def layer(seed: int, plain: bool) -> RowInputs:
        rows = make_rows(2600, MIXED, rows=1, seed=seed)
        return dataclasses.replace(rows, scratch=shared, bias_is_zero=plain)

    spec = StatsSpec()
    layers = [(layer(0, True), 0.25), (layer(1, True), 0.125), (layer(2, False), 0.25)]
    results = finish([layer_pass(rows, scaling, spec) for rows, scaling in layers], spec)
    for (rows, scaling), got in zip(layers, results, strict=True):
        assert_matches(got, direct(rows, scaling))


# What launches no kernel: views, and conversions (on the CPU, 16-bit q.k takes float32 copies
# that a GPU does not; `_bmm_float32`).
NO_KERNEL = {
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice", "squeeze",
    "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "_unsafe_view", "to",
}  # fmt: skip


def kernels_in(run: Callable[[], object]) -> int:
    """How many aten operations `run` calls that would launch a kernel on a GPU."""

    class Count(TorchDispatchMode):
        kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ not in NO_KERNEL:
                Count.kernels += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_layer_of_a_decode_step_launches_four_kernels_on_a_device(
    stats_path: str, dtype: torch.dtype
) -> None:
    """On the device path a layer launches its q.k, its values' float32 copy, p.V and its
    keep-set's values; everything else (the scaling included) runs once per batch of layers
    (`DeviceBatch`). Rows as the hook gives them in a decode step: one row, nothing masked,
    visible keys counted."""
    base = make_rows(5000, MIXED, rows=1)
    base = dataclasses.replace(
        to_16bit(base, dtype) if dtype != torch.float32 else base,
        key=base.key[2:].to(dtype), value=base.value[2:].to(dtype),
        batch_index=torch.zeros(1, dtype=torch.long), bias_is_zero=True, keep_all_valid=True,
        visible=torch.full((1,), 5000),
    )  # fmt: skip

    if stats_path != "torch":
        pytest.skip("the device path's count (the CPU's path launches no kernels)")

    def pass_of(layers: int) -> Callable[[], object]:
        shared: dict[tuple[object, ...], object] = {}
        rows = [dataclasses.replace(base, scratch=shared) for _ in range(layers)]
        spec = StatsSpec()

        def run() -> object:
            with torch.inference_mode():  # as the hook runs it
                return finish([layer_pass(r, 0.25, spec) for r in rows], spec)

        return run

    pass_of(1)()  # first use: a backend without float32-output products is found once
    per_layer = (kernels_in(pass_of(8)) - kernels_in(pass_of(4))) / 4
    assert per_layer == 4


@pytest.mark.parametrize("capacity", [1, 2, 256], ids=["each-alone", "batches-of-two", "one-batch"])
def test_layers_sorted_in_batches_equal_the_direct_computation(
    stats_path: str, capacity: int
) -> None:
    """The device path finishes the layers of a pass together (`DeviceBatch`): one sort each.

    Five layers of one shape and one of another share a pass; a batch holds `capacity` layers
    (the rest of a pass's layers start a new one), and `finish` sorts what is left.
    """
    shared: dict[tuple[object, ...], object] = {}
    layers = [
        dataclasses.replace(make_rows(keys, MIXED, seed=seed), scratch=shared)
        for seed, keys in enumerate([2600] * 3 + [700] + [2600] * 2)
    ]
    layer_bytes = 2 * 8 * 2600 * 4  # rows x heads x keys x float32
    spec = StatsSpec(device_batch_bytes=capacity * layer_bytes)

    def run() -> list[dict[str, torch.Tensor]]:
        return finish([layer_pass(rows, 0.25, spec) for rows in layers], spec)

    expected_sorts = {"numpy": 0, "torch": {1: 6, 2: 4, 256: 2}[capacity]}[stats_path]
    assert sorts_in(run) == expected_sorts
    shared.clear()
    for rows, got in zip(layers, run(), strict=True):
        assert_matches(got, direct(rows, 0.25))


def test_layers_of_one_batch_with_their_own_keep_sets(stats_path: str) -> None:
    """Layers of one shape with different keep-sets (not from one pass plan) each get their own."""
    shared: dict[tuple[object, ...], object] = {}
    first = dataclasses.replace(make_rows(2600, MIXED, seed=0), scratch=shared)
    other = make_rows(2600, MIXED, seed=1)
    moved = other.keep_index.clone()
    moved[:, 4:] -= 100  # its "recent" keys lie further back
    second = dataclasses.replace(other, keep_index=moved, scratch=shared)
    spec = StatsSpec()
    results = finish([layer_pass(rows, 0.25, spec) for rows in (first, second)], spec)
    for rows, got in zip((first, second), results, strict=True):
        assert_matches(got, direct(rows, 0.25))


def test_a_batch_of_layers_with_and_without_the_kernels_output(stats_path: str) -> None:
    """Layers given the kernel's float32 output skip p.V; their batch-mates still compute it."""
    shared: dict[tuple[object, ...], object] = {}
    layers = [dataclasses.replace(make_rows(2600, MIXED, seed=s), scratch=shared) for s in range(3)]
    given = layers[1]
    logits = torch.einsum("nkgd,nkjd->nkgj", given.query, given.key[given.batch_index]) * 0.25
    weights = torch.softmax(logits + given.bias[:, None, None, :], -1)
    output = torch.einsum("nkgj,nkjd->nkgd", weights, given.value[given.batch_index])
    layers[1] = dataclasses.replace(given, output=output)
    spec = StatsSpec()
    results = finish([layer_pass(rows, 0.25, spec) for rows in layers], spec)
    for rows, got in zip(layers, results, strict=True):
        assert_matches(got, direct(rows, 0.25))


@pytest.mark.parametrize("budget, calls", [(1, 5), (16 << 20, 2)], ids=["each-alone", "one-batch"])
def test_cpu_selections_of_a_pass_are_taken_together(
    stats_path: str, budget: int, calls: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the top-k and `keys_for_90pct` of the one-chunk layers of a pass are selected
    together (`HostSelection`): one histogram call per key count, or one per layer once the
    layers queued pass the budget. The first layer's 200 keys are all in its top-k (no count to
    take); the others have spread heads that their top-k does not solve."""
    shared: dict[tuple[object, ...], object] = {}
    layers = [
        dataclasses.replace(make_rows(keys, MIXED, seed=seed), scratch=shared)
        for seed, keys in enumerate([200, 2600, 2600, 700, 2600, 2600])
    ]
    spec = StatsSpec(host_batch_bytes=budget)
    select = topk.select_host
    counted_keys: list[int] = []

    def counting(*args: Any) -> Any:
        counted_keys.append(args[3])
        return select(*args)

    monkeypatch.setattr(topk, "select_host", counting)
    results = finish([layer_pass(rows, 0.25, spec) for rows in layers], spec)
    assert len(counted_keys) == (calls if stats_path == "numpy" else 0)
    for rows, got in zip(layers, results, strict=True):
        assert_matches(got, direct(rows, 0.25))


def test_a_failed_flush_fails_the_pass_instead_of_leaving_statistics_unfilled(
    stats_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that fails in the middle of a pass (out of memory, say) leaves the layers it held
    without statistics: `finish` raises for the pass rather than read what nothing wrote."""
    shared: dict[tuple[object, ...], object] = {}
    layers = [dataclasses.replace(make_rows(2600, MIXED, seed=s), scratch=shared) for s in range(3)]
    layer_bytes = 2 * 8 * 2600 * 4  # rows x heads x keys x float32
    # two layers fill a batch: the device's holds logits, the CPU's shifted logits and weights
    spec = StatsSpec(device_batch_bytes=2 * layer_bytes, host_batch_bytes=4 * layer_bytes)
    where = (device, "sorted_counts") if stats_path == "torch" else (topk, "top_values_host")
    original = getattr(*where)
    calls: list[int] = []

    def failing_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("out of memory (injected)")
        return original(*args)

    monkeypatch.setattr(*where, failing_once)
    first = layer_pass(layers[0], 0.25, spec)
    with pytest.raises(MemoryError):
        layer_pass(layers[1], 0.25, spec)  # the batch is full: its flush fails
    third = layer_pass(layers[2], 0.25, spec)
    with pytest.raises(RuntimeError, match="an earlier flush of this batch failed"):
        finish([first, third], spec)


def test_finish_reads_the_statistics_of_a_one_batch_pass_in_place(stats_path: str) -> None:
    """On the device path `finish` reads what one `DeviceBatch` filled as views of the batch's
    tensors: no stack or concatenation copies a slot of them (on a GPU, a kernel each)."""
    if stats_path != "torch":
        pytest.skip("the CPU's path has no device batch")
    shared: dict[tuple[object, ...], object] = {}
    layers = [dataclasses.replace(make_rows(2600, MIXED, seed=s), scratch=shared) for s in range(4)]
    spec = StatsSpec()
    with torch.inference_mode():  # as the hook runs it
        partials = [layer_pass(rows, 0.25, spec) for rows in layers]
        batch = partials[0].batch
        assert isinstance(batch, device.DeviceBatch) and batch.used == len(layers)
        held = {
            t.untyped_storage().data_ptr()
            for t in (batch.entropy, batch.out, batch.top, batch.before, batch.keep)
        }
        copied: list[str] = []

        class Copies(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if func.overloadpacket in (torch.ops.aten.stack, torch.ops.aten.cat):
                    for tensor in args[0]:
                        if tensor.untyped_storage().data_ptr() in held:
                            copied.append(str(func))
                return func(*args, **(kwargs or {}))

        with Copies():
            results = finish(partials, spec)
    assert copied == []
    for rows, got in zip(layers, results, strict=True):
        assert_matches(got, direct(rows, 0.25))


def test_the_slots_of_a_batch_stack_without_a_copy(stats_path: str) -> None:
    """`stack` of a batch's slots, in order, is a view of the batch's tensor; anything else (slots
    out of order or skipped, tensors of two buffers, one tensor twice) is copied as torch.stack
    does. Every form equals torch.stack."""
    buffer = torch.arange(4 * 3 * 5, dtype=torch.float32).reshape(4, 3, 5)
    other = buffer.clone()
    slots = list(buffer.unbind(0))
    with torch.inference_mode():  # as `finish` runs (views there keep no reference to their base)
        inference_slots = [buffer[i] for i in range(4)]
        viewed = stack(inference_slots)
    assert viewed.data_ptr() == buffer.data_ptr()
    assert torch.equal(viewed, buffer)
    assert stack(slots[1:3]).data_ptr() == slots[1].data_ptr()
    for tensors in (
        [slots[1], slots[0]],
        [slots[0], slots[2]],
        [slots[0], other[1]],
        [slots[2], slots[2]],
        [buffer[0, :, :2], buffer[1, :, :2]],  # not contiguous
    ):
        stacked = stack(tensors)
        assert torch.equal(stacked, torch.stack(tensors))
        assert all(stacked.data_ptr() != t.data_ptr() for t in tensors)
