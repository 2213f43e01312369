"""How long /metrics takes for one model of 1,024 heads (32 layers x 32 heads, 8 KV heads).

Usage:
    python benchmarks/exporter_render.py [--save]

Measures, in one run: the snapshot + render path the HTTP handler uses (median of 30), a full
HTTP GET /metrics on 127.0.0.1, and prometheus_client's generate_latest on the same families for
comparison. No broker needed: the aggregator is fed 600 decoded messages directly.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request

from _exporter_common import report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--save", action="store_true", help="write benchmarks/results/exporter_render.json"
    )
    args = parser.parse_args()
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.aggregate import Aggregator
    from exporter.exposition import render
    from exporter.http import MetricsServer
    from exporter.metrics import ExporterStats, HeadwatchCollector, SeriesLimits
    from exporter.model_state import AggregatePolicy
    from tests.factories import MessageFactory, pattern_probs

    factory = MessageFactory(
        layers=32, heads=32, kv_heads=8, probs=pattern_probs(32, 32, [1, 4, 1, 1, 1, 1, 1]), seed=0
    )
    agg = Aggregator(AggregatePolicy())
    for i in range(600):  # folded as they arrive: the exporter refuses messages from its future
        agg.fold(
            factory.message(timestamp_seconds=float(i)),
            partition=0,
            replay=False,
            now_wall=float(i),
        )
    agg.publish_counters()
    registry = CollectorRegistry(auto_describe=False)
    collector = HeadwatchCollector(lambda: (agg.snapshot(), ExporterStats()), SeriesLimits())
    registry.register(collector)
    body = render(
        registry.collect()
    )  # warm the label cache, as every scrape after the first finds it

    def timed(fn: object, repeats: int = 30) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    server = MetricsServer("127.0.0.1", 0, registry, lambda: (True, {}))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        http_ms = timed(lambda: urllib.request.urlopen(url, timeout=10).read())
    finally:
        server.stop()
    render_ms = timed(lambda: render(registry.collect()))
    library_ms = timed(lambda: generate_latest(registry), repeats=10)
    result = {
        "heads": 1024,
        "series": body.count(b"\n") - body.count(b"\n#"),
        "bytes": len(body),
        "per_head_series": collector.active_series,
        "render_ms": round(render_ms, 2),
        "http_get_ms": round(http_ms, 2),
        "generate_latest_ms": round(library_ms, 2),
        "generate_latest_over_render": round(library_ms / render_ms, 2),
    }
    return report("exporter_render", result, args.save)


if __name__ == "__main__":
    raise SystemExit(main())
