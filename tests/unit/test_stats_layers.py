"""Statistics of several layers finished together, several rows, mixed heads, chunk layouts."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

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


@pytest.mark.parametrize("keys", [4097, 65537, 131073, 147455])
def test_default_chunk_holds_a_128k_context_in_one_chunk(keys: int) -> None:
    """A decode row at up to 128K tokens of context (and 1/8 more) is one chunk by default: one-
    chunk layers take the sync-free device path on a GPU, where two chunks cost about 2-4x as
    much (H200). The settings and the statistics' own default agree."""
    from collector.settings import CollectorSettings

    assert CollectorSettings().chunk_keys == StatsSpec().chunk_keys
    assert len(chunk_bounds(keys, StatsSpec().chunk_keys)) == 1


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
