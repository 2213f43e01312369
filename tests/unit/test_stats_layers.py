"""Statistics of several layers finished together, several rows, mixed heads, chunk layouts."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from collector import topk
from collector.stats import (
    RowInputs,
    StatsSpec,
    chunk_bounds,
    finish,
    layer_pass,
    products,
    row_statistics,
)
from collector.stats.products import weighted_values

# Each test runs on the numpy (CPU) and the torch (GPU) path: see the stats_path fixture.
pytestmark = pytest.mark.usefixtures("stats_path")


def make_rows(keys: int, q_scales: list[float], rows: int = 2, seed: int = 0) -> RowInputs:
    """Rows read different batch entries; each query head has its own scale (peaked or spread)."""
    generator = torch.Generator().manual_seed(seed)
    kv_heads, group, d = 2, len(q_scales) // 2, 16
    scale = torch.tensor(q_scales).reshape(1, kv_heads, group, 1)
    query = torch.randn(rows, kv_heads, group, d, generator=generator) * scale
    key = torch.randn(3, kv_heads, keys, d, generator=generator)
    value = torch.randn(3, kv_heads, keys, d, generator=generator)
    bias = torch.zeros(rows, keys)
    bias[1:, : keys // 3] = -math.inf  # the second row sees only the last two thirds
    sink = torch.arange(4)[None].expand(rows, 4).clone()
    sink[1:] += keys // 3
    keep = torch.cat([sink, torch.arange(keys - 8, keys)[None].expand(rows, 8)], 1)
    is_sink = torch.zeros_like(keep, dtype=torch.bool)
    is_sink[:, :4] = True
    return RowInputs(
        query, key, value, torch.tensor([2, 0])[:rows], bias, keep, is_sink,
        torch.ones_like(keep, dtype=torch.bool),
    )  # fmt: skip


def direct(rows: RowInputs, scaling: float) -> dict[str, torch.Tensor]:
    """Float64 reference over every probability: (rows, heads) per statistic."""
    n, kv_heads, group, _ = rows.query.shape
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(n):
        b = int(rows.batch_index[i])
        q, k, v = rows.query[i].double(), rows.key[b].double(), rows.value[b].double()
        logits = torch.einsum("kgd,kjd->kgj", q, k) * scaling + rows.bias[i].double()
        p = torch.softmax(logits, -1)
        o = torch.einsum("kgj,kjd->kgd", p, v)
        keep, is_sink = rows.keep_index[i], rows.keep_is_sink[i]
        kp = p[..., keep]
        kept = torch.einsum("kgj,kjd->kgd", kp, v[:, keep]) / kp.sum(-1, keepdim=True)
        cum = p.sort(-1, descending=True).values.cumsum(-1)
        values = {
            "entropy_nats": -torch.special.xlogy(p, p).sum(-1),
            "sink_mass": kp[..., is_sink].sum(-1),
            "recent_mass": kp[..., ~is_sink].sum(-1),
            "top1_mass": cum[..., 0],
            "top16_mass": cum[..., 15],
            "top256_mass": cum[..., min(256, cum.shape[-1]) - 1],
            "eviction_error": (o - kept).norm(dim=-1) / o.norm(dim=-1),
            "keys_for_90pct": ((cum < 0.9).sum(-1) + 1).double(),
        }
        for name, value in values.items():
            out.setdefault(name, []).append(value.reshape(kv_heads * group))
    return {name: torch.stack(v) for name, v in out.items()}


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, expected in want.items():
        tolerance = {"eviction_error": 1e-4, "keys_for_90pct": 0.0}.get(name, 1e-5)
        torch.testing.assert_close(got[name].double(), expected, atol=tolerance, rtol=0, msg=name)


MIXED = [0.2, 4.0, 0.05, 30.0, 1.0, 0.1, 8.0, 0.3]  # spread heads need the histogram, peaked do not


@pytest.mark.parametrize("chunk_keys", [300, 1000, 4096], ids=["chunks", "remainder", "one"])
def test_mixed_heads_and_rows_equal_the_direct_computation(chunk_keys: int) -> None:
    rows = make_rows(2600, MIXED)
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=chunk_keys))
    assert_matches(got, direct(rows, 0.25))
    assert got["visible_keys"].tolist() == [2600, 2600 - 2600 // 3]


def test_layers_of_different_lengths_finish_together_as_each_alone() -> None:
    """Padding the top-k and the keep-set of a short layer changes none of its statistics."""
    spec = StatsSpec(chunk_keys=500)
    layers = [make_rows(keys, MIXED, seed=keys) for keys in (3000, 200, 1200)]
    together = finish([layer_pass(r, 0.25, spec) for r in layers], spec)
    for rows, got in zip(layers, together, strict=True):
        assert_matches(got, direct(rows, 0.25))


def test_logits_far_below_the_maximum_count_as_zero_mass() -> None:
    """Keys 100+ nats below the maximum (exp floor) leave every statistic exact."""
    rows = make_rows(1500, [60.0] * 8)
    assert_matches(row_statistics(rows, 0.25, StatsSpec()), direct(rows, 0.25))


@pytest.mark.parametrize(
    ("keys", "chunk", "count"),
    [(65537, 65536, 1), (73727, 65536, 1), (73728, 65536, 2), (10, 3, 4), (9, 3, 3), (5, 8, 1)],
)
def test_chunks_cover_the_keys_with_the_remainder_first(keys: int, chunk: int, count: int) -> None:
    """A remainder under an eighth of a chunk joins the first chunk (65,536 + 1 keys: one chunk)."""
    bounds = chunk_bounds(keys, chunk)
    assert len(bounds) == count
    assert bounds[0][0] == 0 and bounds[-1][1] == keys
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(0 < stop - start <= chunk + chunk // 8 for start, stop in bounds)
    assert all(stop - start == chunk for start, stop in bounds[1:])


@pytest.mark.parametrize("masked", [0, 19_000], ids=["all-visible", "few-visible"])
def test_long_rows_take_the_block_maximum_bound_for_the_top_k(masked: int) -> None:
    """20,000 keys (>= 64 x 256): the top-k is gathered above a bound, or directly when masked keys tie."""
    rows = make_rows(20_000, MIXED)
    rows.bias[:, :masked] = -math.inf
    keep = rows.keep_index
    keep[:, :4] = torch.arange(masked, masked + 4)
    assert_matches(row_statistics(rows, 0.25, StatsSpec()), direct(rows, 0.25))


def test_a_fully_masked_row_leaves_its_neighbours_exact() -> None:
    """A row without visible keys ties all 20,000 keys in one bin; the other row is still counted exactly."""
    rows = make_rows(20_000, MIXED)
    rows.bias[1] = -math.inf
    got = row_statistics(rows, 0.25, StatsSpec())
    want = direct(rows, 0.25)
    assert bool(torch.isnan(got["entropy_nats"][1]).all())
    assert_matches({k: v[:1] for k, v in got.items()}, {k: v[:1] for k, v in want.items()})


def test_near_ties_beyond_the_sorted_limit_are_counted_as_equal_across_chunks() -> None:
    """40,000 equal logits in chunks of 7,000: one bin holds them all; 90% is 36,000 keys."""
    rows = make_rows(40_000, [0.0] * 4 + [0.3] * 4, rows=1)
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=7000))
    want = direct(rows, 0.25)
    assert got["keys_for_90pct"][0, :4].tolist() == [36000.0] * 4
    assert_matches({k: got[k][:, 4:] for k in want}, {k: v[:, 4:] for k, v in want.items()})


def test_near_ties_in_one_chunk_are_counted_exactly() -> None:
    """40,000 equal logits in one chunk (the device path sorts the row): 90% is 36,000 keys."""
    rows = make_rows(40_000, [0.0] * 4 + [0.3] * 4, rows=1)
    got = row_statistics(rows, 0.25, StatsSpec())
    want = direct(rows, 0.25)
    assert got["keys_for_90pct"][0, :4].tolist() == [36000.0] * 4
    assert_matches({k: got[k][:, 4:] for k in want}, {k: v[:, 4:] for k, v in want.items()})


@pytest.mark.parametrize("keys", [4095, 4096, 9000])
def test_weighted_values_split_over_key_blocks_equal_one_product(keys: int) -> None:
    """p.V in blocks of keys (the device path from 4,096 keys on, padded to whole blocks), from 16-bit values."""
    generator = torch.Generator().manual_seed(keys)
    weights = torch.rand(2, 2, 4, keys, generator=generator)
    values = torch.randn(2, 2, keys, 16, generator=generator)
    got, upcast = weighted_values(weights, values.bfloat16())
    want = torch.matmul(weights.double(), values.bfloat16().double())
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-5)
    assert upcast.dtype == torch.float32 and bool((upcast == values.bfloat16().float()).all())


def to_16bit(rows: RowInputs, dtype: torch.dtype) -> RowInputs:
    """The same rows with 16-bit queries, keys and values (as a bfloat16 or float16 model has them)."""
    return dataclasses.replace(
        rows, query=rows.query.to(dtype), key=rows.key.to(dtype), value=rows.value.to(dtype)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("keys", "rows", "entries"),
    [(5000, 1, 1), (5000, 2, 1), (5000, 2, 3), (20_000, 2, 3)],
    ids=["one-row", "two-rows-one-entry", "two-rows-two-entries", "long"],
)
def test_16bit_rows_equal_the_direct_computation_from_their_values(
    dtype: torch.dtype, keys: int, rows: int, entries: int
) -> None:
    """16-bit queries, keys and values: statistics of the float32 products of those values.

    The device path multiplies the 16-bit keys as they are (`_mixed_logits`: one row, rows
    of one batch entry, rows of several) and upcasts the values once.
    """
    inputs = make_rows(keys, MIXED, rows=rows)
    if entries == 1:  # one batch entry in the cache, every row reads it
        inputs = dataclasses.replace(
            inputs,
            key=inputs.key[2:],
            value=inputs.value[2:],
            batch_index=torch.zeros(rows, dtype=torch.long),
        )
    inputs = to_16bit(inputs, dtype)
    got = row_statistics(inputs, 0.25, StatsSpec())
    upcast = dataclasses.replace(
        inputs, query=inputs.query.float(), key=inputs.key.float(), value=inputs.value.float()
    )
    assert_matches(got, direct(upcast, 0.25))


def test_heads_needing_more_than_the_top_k_but_fewer_than_1024_keys_are_exact() -> None:
    """Counts just beyond the top-k (257 to 1024 keys) are exact.

    (Seed 0 of these scales puts one head's cumulative mass at 281 keys 5e-7 below 90%, inside
    the float32 slack that counts it as reached: the reference says 282.)
    """
    rows = make_rows(3000, [1.5, 1.8, 2.0, 2.2, 2.5, 2.8, 3.0, 3.5], seed=1)
    want = direct(rows, 0.25)
    counts = want["keys_for_90pct"]
    assert bool(((counts > 256) & (counts <= 1024)).sum() >= 4)
    assert_matches(row_statistics(rows, 0.25, StatsSpec()), want)


def test_a_backend_without_float32_output_products_takes_float32_copies() -> None:
    """The CPU has no `torch.bmm(..., out_dtype=float32)` for 16-bit inputs: found once, then copies."""
    left = torch.randn(2, 5, 8).bfloat16()
    right = torch.randn(2, 8, 3).bfloat16()
    products._NO_FLOAT32_OUTPUT.discard("cpu")
    got = products._bmm_float32(left, right)
    assert got.dtype == torch.float32
    assert "cpu" in products._NO_FLOAT32_OUTPUT
    torch.testing.assert_close(got, torch.bmm(left.float(), right.float()))


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
