"""On CUDA: the statistics of long rows (one-chunk sort, block top-k, histogram, chunks, near-ties) equal the CPU ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from collector.stats import RowInputs, StatsSpec, finish, layer_pass, row_statistics
from tests.unit.test_stats_layers import MIXED, direct, make_rows, to_16bit

pytestmark = pytest.mark.gpu


def to_cuda(rows: RowInputs) -> RowInputs:
    r = rows
    return RowInputs(
        r.query.cuda(), r.key.cuda(), r.value.cuda(), r.batch_index.cuda(), r.bias.cuda(),
        r.keep_index.cuda(), r.keep_is_sink.cuda(), r.keep_valid.cuda(),
    )  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("keys", "scales", "chunk_keys"),
    [
        (20_000, MIXED, 65536),
        (20_000, MIXED, 7000),
        (40_000, [0.0] * 4 + [0.3] * 4, 7000),
        (40_000, [0.0] * 4 + [0.3] * 4, 65536),
    ],
    ids=["one-chunk", "chunks", "near-ties", "near-ties-one-chunk"],
)
def test_cuda_statistics_equal_cpu_statistics(
    keys: int, scales: list[float], chunk_keys: int
) -> None:
    rows = make_rows(keys, scales)
    spec = StatsSpec(chunk_keys=chunk_keys)
    cpu = row_statistics(rows, 0.25, spec)
    gpu = row_statistics(to_cuda(rows), 0.25, spec)
    for name, value in cpu.items():
        tolerance = {"eviction_error": 1e-4, "keys_for_90pct": 1.0}.get(name, 2e-5)
        torch.testing.assert_close(
            gpu[name].cpu().double(), value.double(), atol=tolerance, rtol=0, msg=name
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 2], ids=["one-batch-entry", "two-batch-entries"])
def test_cuda_bfloat16_statistics_equal_the_direct_computation(rows: int) -> None:
    """bfloat16 keys multiplied as they are into float32 (`torch.bmm(..., out_dtype=)`)."""
    inputs = make_rows(20_000, MIXED, rows=rows)
    if rows == 1:
        inputs = dataclasses.replace(
            inputs, key=inputs.key[2:], value=inputs.value[2:], batch_index=torch.tensor([0])
        )
    inputs = to_16bit(inputs, torch.bfloat16)
    got = row_statistics(to_cuda(inputs), 0.25, StatsSpec())
    upcast = dataclasses.replace(
        inputs, query=inputs.query.float(), key=inputs.key.float(), value=inputs.value.float()
    )
    for name, value in direct(upcast, 0.25).items():
        # float32 sums in another order may move a count at the 90% crossing by one key
        tolerance = {"eviction_error": 1e-4, "keys_for_90pct": 1.0}.get(name, 1e-5)
        torch.testing.assert_close(
            got[name].cpu().double(), value, atol=tolerance, rtol=0, msg=name
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layers_sorted_in_batches_equal_the_cpu_statistics() -> None:
    """Layers of a pass share batches (`DeviceBatch`): two of two layers, one of one."""
    shared: dict[tuple[object, ...], object] = {}
    layers = [make_rows(20_000, MIXED, seed=seed) for seed in range(3)]
    spec = StatsSpec(device_batch_bytes=2 * 2 * 8 * 20_000 * 4)  # two layers' logits
    gpu = finish(
        [layer_pass(dataclasses.replace(to_cuda(r), scratch=shared), 0.25, spec) for r in layers],
        spec,
    )
    for rows, got in zip(layers, gpu, strict=True):
        for name, value in row_statistics(rows, 0.25, spec).items():
            tolerance = {"eviction_error": 1e-4, "keys_for_90pct": 1.0}.get(name, 2e-5)
            torch.testing.assert_close(
                got[name].cpu().double(), value.double(), atol=tolerance, rtol=0, msg=name
            )
