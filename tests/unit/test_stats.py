"""Statistics against a direct float64 computation: chunking, GQA, soft-cap, learned sinks, masks."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from collector import topk
from collector.stats import RowInputs, StatsSpec, row_statistics

# Each test runs on the numpy (CPU) and the torch (GPU) path: see the stats_path fixture.
pytestmark = pytest.mark.usefixtures("stats_path")


def make_rows(
    keys: int, q_scale: float, masked_prefix: int = 0, kv_heads: int = 2, group: int = 3,
    sinks: torch.Tensor | None = None, seed: int = 0,
) -> RowInputs:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    d = 16
    query = torch.randn(1, kv_heads, group, d, generator=generator) * q_scale
    key = torch.randn(2, kv_heads, keys, d, generator=generator)
    value = torch.randn(2, kv_heads, keys, d, generator=generator)
    bias = torch.zeros(1, keys)
    bias[0, :masked_prefix] = -math.inf
    keep = torch.cat(
        [torch.arange(masked_prefix, masked_prefix + 4), torch.arange(keys - 8, keys)]
    )[None]
    is_sink = torch.zeros_like(keep, dtype=torch.bool)
    is_sink[0, :4] = True
    return RowInputs(
        query,
        key,
        value,
        torch.tensor([1]),
        bias,
        keep,
        is_sink,
        torch.ones_like(keep, dtype=torch.bool),
        sinks,
    )


def direct(
    rows: RowInputs, scaling: float, softcap: float | None = None
) -> dict[str, torch.Tensor]:
    """Float64 reference: materialise every probability."""
    kv_heads, group = rows.query.shape[1:3]
    q = rows.query[0].double()
    k = rows.key[1].double()
    v = rows.value[1].double()
    logits = torch.einsum("kgd,kjd->kgj", q, k) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + rows.bias[0].double()
    if rows.sinks is not None:
        atom = rows.sinks.double().reshape(kv_heads, group, 1)
        full = torch.softmax(torch.cat([logits, atom], -1), -1)
        p, p_atom = full[..., :-1], full[..., -1]
    else:
        p, p_atom = torch.softmax(logits, -1), torch.zeros(kv_heads, group, dtype=torch.float64)
    entropy = -torch.special.xlogy(p, p).sum(-1) - torch.special.xlogy(p_atom, p_atom)
    out = torch.einsum("kgj,kjd->kgd", p, v)
    keep = rows.keep_index[0]
    kp = p[..., keep]
    kept = torch.einsum("kgj,kjd->kgd", kp, v[:, keep]) / (kp.sum(-1) + p_atom)[..., None]
    cum = p.sort(-1, descending=True).values.cumsum(-1)
    target = 0.9 * (1 - p_atom)
    return {
        "entropy_nats": entropy.reshape(-1),
        "sink_mass": p[..., keep[:4]].sum(-1).reshape(-1),
        "recent_mass": p[..., keep[4:]].sum(-1).reshape(-1),
        "top1_mass": cum[..., 0].reshape(-1),
        "top16_mass": cum[..., 15].reshape(-1),
        "top256_mass": cum[..., min(256, cum.shape[-1]) - 1].reshape(-1),
        "eviction_error": ((out - kept).norm(dim=-1) / out.norm(dim=-1)).reshape(-1),
        "keys_for_90pct": ((cum < target[..., None]).sum(-1) + 1).double().reshape(-1),
        **({} if rows.sinks is None else {"learned_sink_mass": p_atom.reshape(-1)}),
    }


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, expected in want.items():
        tolerance = 1e-4 if name == "eviction_error" else 1e-5
        torch.testing.assert_close(
            got[name][0].double(), expected, atol=tolerance, rtol=0, msg=name
        )


@pytest.mark.parametrize("chunk_keys", [97, 512, 65536])
@pytest.mark.parametrize("q_scale", [0.3, 3.0], ids=["spread", "peaked"])
def test_chunked_statistics_equal_the_direct_computation(chunk_keys: int, q_scale: float) -> None:
    rows = make_rows(3000, q_scale, masked_prefix=37)
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=chunk_keys))
    assert_matches(got, direct(rows, 0.25))
    assert int(got["visible_keys"][0]) == 3000 - 37


def test_keys_for_90pct_beyond_the_largest_top_k_is_exact() -> None:
    rows = make_rows(5000, 0.2)
    want = direct(rows, 0.25)["keys_for_90pct"]
    assert bool((want > 256).all())
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=700))
    torch.testing.assert_close(got["keys_for_90pct"][0].double(), want, atol=0, rtol=0)


def test_equal_logits_need_ninety_percent_of_the_keys() -> None:
    rows = make_rows(1000, 0.0)
    got = row_statistics(rows, 0.25, StatsSpec())
    assert got["keys_for_90pct"][0].tolist() == [900.0] * 6
    torch.testing.assert_close(
        got["entropy_nats"][0], torch.full((6,), math.log(1000)), atol=1e-5, rtol=0
    )


def test_soft_capping_is_applied_before_the_mask() -> None:
    rows = make_rows(600, 3.0, masked_prefix=5)
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=128), softcap=2.0)
    assert_matches(got, direct(rows, 0.25, softcap=2.0))


def test_learned_sink_logits_take_mass_from_every_key() -> None:
    rows = make_rows(400, 1.0, sinks=torch.linspace(-1.0, 3.0, 6))
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=100))
    assert_matches(got, direct(rows, 0.25))


@pytest.mark.parametrize("chunk_keys", [512, 65536], ids=["chunks", "one"])
def test_learned_sink_mass_is_reported_and_no_key_holds_it(chunk_keys: int) -> None:
    """The learned sink is neither sink, recent nor middle: the keys hold 1 - its mass."""
    rows = make_rows(2000, 1.0, sinks=torch.linspace(-1.0, 6.0, 6))
    got = row_statistics(rows, 0.25, StatsSpec(chunk_keys=chunk_keys))
    want = direct(rows, 0.25)
    assert_matches(got, want)
    assert float(want["learned_sink_mass"].max()) > 0.1
    assert "learned_sink_mass" not in row_statistics(make_rows(400, 1.0), 0.25, StatsSpec())


def test_fully_masked_row_is_nan_not_an_exception() -> None:
    rows = make_rows(64, 1.0)
    rows.bias.fill_(-math.inf)
    got = row_statistics(rows, 0.25, StatsSpec())
    assert int(got["visible_keys"][0]) == 0
    assert bool(torch.isnan(got["entropy_nats"]).all())


def test_non_finite_keys_give_nan() -> None:
    rows = make_rows(64, 1.0)
    rows.key[1, 0, 10, 0] = math.nan
    got = row_statistics(rows, 0.25, StatsSpec())
    for name, value in got.items():  # every statistic of the NaN key's heads, none of the others'
        if name != "visible_keys":
            assert bool(torch.isnan(value[0, :3]).all()), name
            assert bool(torch.isfinite(value[0, 3:]).all()), name


def allocations(run: Callable[[], object]) -> tuple[int, int]:
    """Return (the largest tensor torch allocates, the peak of numpy and Python memory) in `run`.

    tracemalloc sees numpy's buffers but not torch's, which a dispatch mode sees: every tensor an
    operation returns whose storage none of its arguments holds (views and `out=` results
    excluded) is a new allocation. `run` runs once for each (the mode's own Python objects
    would count in tracemalloc's peak).
    """

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            held = {
                t.untyped_storage().data_ptr()
                for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                    Largest.nbytes = max(Largest.nbytes, t.untyped_storage().nbytes())
            return out

    with Largest():
        run()
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Largest.nbytes, peak


def test_memory_stays_bounded_by_the_chunk_at_128k_keys() -> None:
    """128K keys, 8 query heads: no intermediate is larger than a chunk's logits or keys."""
    keys, chunk, kv_heads, group, d = 131072, 8192, 2, 4, 16
    heads = kv_heads * group
    rows = make_rows(keys, 0.2, kv_heads=kv_heads, group=group)
    # torch: a chunk's float32 logits (rows x heads x chunk) or keys (rows x kv heads x chunk x
    # d), at most 1.125 chunks long, or the float32 bias row of each row (rows x keys).
    bound = 4 * max((chunk + chunk // 8) * max(heads, kv_heads * d), keys)
    # numpy (the CPU's selections): a few chunks' copies, and the keys of the histogram's
    # crossing bin, at most `_MAX_SORTED` per row and head (a few float64 copies of them).
    crossing = 4 * 8 * heads * topk._MAX_SORTED
    got: dict[str, torch.Tensor] = {}
    largest, peak = allocations(
        lambda: got.update(row_statistics(rows, 0.25, StatsSpec(chunk_keys=chunk)))
    )
    assert bool(torch.isfinite(got["entropy_nats"]).all())
    assert abs(float(got["top1_mass"].sum()) - float(direct(rows, 0.25)["top1_mass"].sum())) < 1e-4
    assert largest <= bound
    assert peak <= 4 * bound + crossing
    # The same measurement sees one chunk over every key.
    whole = StatsSpec(chunk_keys=keys)
    largest, peak = allocations(lambda: row_statistics(rows, 0.25, whole))
    assert largest > 8 * bound
    assert peak > 4 * bound + crossing or not topk.on_host(rows.query)
