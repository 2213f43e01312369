"""One sampled query row over all layers vs one decode step of the same model at the same context.

Usage:
    python benchmarks/collector_sampled_row.py --contexts 4096 16384 65536 [--save]

Both read the whole KV cache once (the floor). The cache is filled with random keys and values
(a prefill at 64K would take hours on 2 CPU cores); queries come from the model. Reported:
the plain decode step, the same step with its row measured (all layers), and the collector's own
`headwatch_collector_stats_seconds` for that row; ratio = stats seconds / plain decode seconds,
medians of interleaved repeats. Unit-variance random keys give near-uniform attention, where
`keys_for_90pct` needs its two extra passes: the worst case. `--key-scale 8` spreads the logits
so that a few keys hold most of the mass (peaked heads, as most trained heads are: the top-k
answers `keys_for_90pct` and no extra pass runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import llama, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--key-scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 steadies timings)")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    from collector import MemorySink, attach
    from collector.metrics import CollectorMetrics

    model = llama(hidden=256, layers=args.layers, heads=8, kv_heads=2, head_dim=32)
    torch.manual_seed(1)
    rows = {}
    with torch.no_grad():
        for context in args.contexts:
            cache = DynamicCache(config=model.config)
            for layer in range(args.layers):
                keys = torch.randn(1, 2, context, 32) * args.key_scale
                cache.update(keys, torch.randn(1, 2, context, 32), layer)
            token, position = torch.tensor([[5]]), torch.tensor([[context]])

            def step(
                cache: DynamicCache = cache,
                token: torch.Tensor = token,
                position: torch.Tensor = position,
            ) -> float:
                started = time.perf_counter()
                model(token, cache=cache, position_ids=position, use_cache=True)
                elapsed = time.perf_counter() - started
                cache.crop(-1)
                return elapsed

            plain, measured, stats = [], [], []
            sink = MemorySink()
            for _ in range(args.repeats + 1):
                plain.append(step())
                metrics = CollectorMetrics()
                # A fresh attach makes this cache a new request whose last row is measured.
                with attach(model, sink=sink, metrics=metrics, sample_rate=1.0, min_context_tokens=0,
                            max_sampled_passes_per_second=1e6):  # fmt: skip
                    measured.append(step())
                stats.append(
                    metrics.value("headwatch_collector_stats_seconds_sum", model_name="llama")
                )
            plain, measured, stats = plain[1:], measured[1:], stats[1:]  # first run warms up
            if not (sink.messages and sink.messages[-1].valid.all()):
                raise RuntimeError("the measured row produced no valid message")
            decode = statistics.median(plain)
            row = statistics.median(stats)
            rows[str(context)] = {
                "decode_seconds": round(decode, 5),
                "decode_with_row_seconds": round(statistics.median(measured), 5),
                "row_stats_seconds": round(row, 5),
                "ratio": round(row / decode, 3),
            }
            print(context, rows[str(context)], file=sys.stderr)
    worst = max(r["ratio"] for r in rows.values())
    name = (
        "collector_sampled_row"
        if args.key_scale == 1.0
        else f"collector_sampled_row_keys_x{args.key_scale:g}"
    )
    return report(
        name,
        {
            "key_scale": args.key_scale,
            "model": f"llama {args.layers} layers, 8 query / 2 KV heads, head_dim 32, fp32, DynamicCache",
            "contexts": rows,
            "ratio": worst,
        },
        args.save,
    )


if __name__ == "__main__":
    sys.exit(main())
