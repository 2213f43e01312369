"""One sampled query row over all layers vs one decode step of the same model at the same context.

Usage:
    python benchmarks/collector_sampled_row.py --contexts 4096 16384 65536 [--save]
    python benchmarks/collector_sampled_row.py --device cuda --geometry llama3-8b --save

Both read the whole KV cache once (the floor). The cache is filled with random keys and values
(a prefill at 64K would take hours on 2 CPU cores); queries come from the model. Reported:
the plain decode step, the same step with its row measured (all layers), and the collector's own
`headwatch_collector_stats_seconds` for that row (planning, per-layer statistics, finishing and
message assembly); ratio = stats seconds / plain decode seconds, step_ratio = (measured step -
plain step) / plain step, medians of interleaved repeats; paired_step_ratio = the median over
repeats of (measured step - the plain step just before it) / that plain step. Unit-variance random keys give
near-uniform attention, where `keys_for_90pct` needs its histogram passes: the worst case. `--key-scale 8` spreads the logits
so that a few keys hold most of the mass (peaked heads, as most trained heads are: the top-k
answers `keys_for_90pct` and no extra pass runs).

`--geometry llama3.2-1b` (16 layers, 32 query / 8 KV heads of 64; 4.9 GB in float32) is a real
model's shape that fits this machine's memory with a 64K-token cache: there the decode step reads
weights and cache as a served model does, while the tiny model is the worst case for the ratio
(fixed per-operation costs against a decode step that does almost nothing).
`--geometry llama3-8b` builds a random-weight model of Llama-3-8B's shape (32 layers, hidden 4096,
32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256; 16 GB in bf16) directly on the
device: the decode step then reads the weights and the cache as a real one does. On CUDA every
timing is bracketed by `torch.cuda.synchronize()`, and `plain_step_peak_mib` /
`measured_step_peak_mib` are the largest peaks of device memory a step allocated above what was
allocated before it (the collector's working memory is their difference).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GEOMETRIES, geometry_llama, report, shape_suffix

# the bound's contexts; results at others are saved under their own name
DEFAULT_CONTEXTS = [4096, 16384, 65536]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the geometry's layers")
    parser.add_argument("--key-scale", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 steadies timings)")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="ROWS",
        help="after the timings, profile one plain and one measured step at the last context and "
        "print their ROWS costliest operations (device time on CUDA) to stderr",
    )  # fmt: skip
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    from collector import MemorySink, attach
    from collector.metrics import CollectorMetrics

    device = args.device
    model = geometry_llama(args.geometry, device, args.dtype, args.layers)
    layers, heads, kv_heads, head_dim = (
        model.config.num_hidden_layers, model.config.num_attention_heads,
        model.config.num_key_value_heads, model.config.head_dim,
    )  # fmt: skip
    dtype = str(model.dtype).removeprefix("torch.")
    cuda = device.startswith("cuda")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    peaks: list[int] = []  # on CUDA: each step's peak allocation above its start, in bytes
    # transformers renamed `past_key_values` to `cache` in 5.2x; an unknown keyword would be
    # swallowed by **kwargs and the step would run with no cache at all
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    torch.manual_seed(1)
    rows = {}
    with torch.no_grad():
        for context in args.contexts:
            cache = DynamicCache(config=model.config)
            for layer in range(layers):
                shape = (1, kv_heads, context, head_dim)
                keys = torch.randn(shape, device=device, dtype=model.dtype) * args.key_scale
                cache.update(keys, torch.randn(shape, device=device, dtype=model.dtype), layer)
            token = torch.tensor([[5]], device=device)
            position = torch.tensor([[context]], device=device)

            def step(
                cache: DynamicCache = cache,
                token: torch.Tensor = token,
                position: torch.Tensor = position,
            ) -> float:
                synchronize()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    peaks.append(-torch.cuda.memory_allocated())
                started = time.perf_counter()
                model(token, position_ids=position, use_cache=True, **{cache_kw: cache})
                synchronize()
                elapsed = time.perf_counter() - started
                if cuda:  # what the step held beyond what was allocated before it
                    peaks[-1] += torch.cuda.max_memory_allocated()
                cache.crop(-1)
                return elapsed

            plain, measured, stats = [], [], []
            peaks.clear()
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
            if sink.messages[-1].context_tokens != context + 1:
                raise RuntimeError(
                    f"expected the measured row to see {context + 1} keys, "
                    f"got {sink.messages[-1].context_tokens}: the cache was not used"
                )
            decode = statistics.median(plain)
            row = statistics.median(stats)
            rows[str(context)] = {
                "decode_seconds": round(decode, 5),
                "decode_with_row_seconds": round(statistics.median(measured), 5),
                "row_stats_seconds": round(row, 5),
                "ratio": round(row / decode, 3),
                # what the whole step gained, hooks and allocator effects included
                "step_ratio": round((statistics.median(measured) - decode) / decode, 3),
                # the same from each repeat's pair (a plain step, then a measured one)
                "paired_step_ratio": round(
                    statistics.median((m - p) / p for m, p in zip(measured, plain, strict=True)), 3
                ),
            }
            if cuda:  # the largest step peaks of each kind (plain, measured steps alternate)
                rows[str(context)]["plain_step_peak_mib"] = round(max(peaks[0::2]) / 2**20, 1)
                rows[str(context)]["measured_step_peak_mib"] = round(max(peaks[1::2]) / 2**20, 1)
            print(context, rows[str(context)], file=sys.stderr)
            if args.profile and context == args.contexts[-1]:
                profile(step, "plain step", device, args.profile)
                with attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0,
                            max_sampled_passes_per_second=1e6):  # fmt: skip
                    profile(step, "step with its row measured", device, args.profile)
            del cache
    worst = max(r["ratio"] for r in rows.values())
    stem = "collector_sampled_row"
    if args.key_scale != 1.0:
        stem += f"_keys_x{args.key_scale:g}"
    stem += shape_suffix(args.geometry, device)
    if args.contexts != DEFAULT_CONTEXTS:
        stem += "_ctx" + "-".join(map(str, args.contexts))
    return report(
        "collector_sampled_row",
        {
            "key_scale": args.key_scale,
            "model": (
                f"llama ({args.geometry}) {layers} layers, {heads} query / {kv_heads} KV heads, "
                f"head_dim {head_dim}, {dtype}, DynamicCache, random weights"
            ),
            "contexts": rows,
            "ratio": worst,
        },
        args.save,
        file_stem=stem,
        device=device,
    )


def profile(step: Callable[[], float], title: str, device: str, rows: int) -> None:
    """Print to stderr the `rows` costliest operations of one `step` and its host-device syncs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profiler(activities=activities) as prof:
        seconds = step()
    events = prof.key_averages()
    syncs = {
        event.key: event.count
        for event in events
        if event.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
    }
    kernels = sum(event.count for event in events if event.key == "cudaLaunchKernel")
    print(
        f"profile of one {title}: {seconds * 1e3:.2f} ms, {kernels} kernel launches, syncs {syncs}",
        file=sys.stderr,
    )
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=rows), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
