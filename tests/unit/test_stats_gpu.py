"""On CUDA: the statistics of long rows (one-chunk sort, block top-k, histogram, chunks, near-ties) equal the CPU ones."""

from __future__ import annotations

import pytest
import torch

from collector.stats import RowInputs, StatsSpec, row_statistics
from tests.unit.test_stats_layers import MIXED, make_rows

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
