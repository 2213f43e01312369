"""Publisher memory through a broker outage under load, against a real Kafka broker.

Usage:
    python benchmarks/collector_publisher_outage.py                       # 30 s outage (CI size)
    python benchmarks/collector_publisher_outage.py --outage-seconds 600  # the 10-minute version

Starts a broker of its own (headwatch.localstack: the real Apache Kafka jars), publishes 32 x 32
messages at `--rate` per second from a load thread, SIGKILLs the broker, keeps publishing for
`--outage-seconds`, restarts it and waits for publishing to resume. Python heap growth over the
pre-outage baseline (tracemalloc) is compared with the publisher's cap, queue bytes plus producer
buffer bytes; the 99th percentile and the slowest publish() call are reported too. The load
thread records latencies into an array allocated before the baseline, so that the benchmark's
own bookkeeping (a list of 120,000 floats is about 4 MB after 10 minutes) is not counted as the
publisher's memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import report


def synthetic_messages(count: int) -> list[Any]:
    """Return `count` distinct 32 x 32 messages with plausible statistics."""
    import uuid

    import numpy as np

    from collector.schema import HeadStatsMessage, MessageHeader, core_stat_names

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        header = MessageHeader(
            message_id=uuid.uuid4().hex, model_name="bench", config_hash="0123456789abcdef",
            timestamp_seconds=time.time(), phase="prefill", context_tokens=4096, query_position=4095,
            sink_tokens=4, recent_tokens=256, num_layers=32, num_query_heads=32, num_kv_heads=8,
            head_dim=128, kv_dtype_bytes=2, sample_rate=0.01, visible_keys=(4096,) * 32,
            stat_names=core_stat_names(),
        )  # fmt: skip
        shape = (32, 32)
        sink = rng.uniform(0, 0.6, shape)
        recent = rng.uniform(0, 0.4, shape)
        stats = {
            "entropy_nats": rng.uniform(0.5, 8, shape), "sink_mass": sink, "recent_mass": recent,
            "top1_mass": rng.uniform(0, 0.3, shape), "top16_mass": rng.uniform(0.3, 0.6, shape),
            "top256_mass": rng.uniform(0.6, 1, shape), "keys_for_90pct": rng.integers(1, 4096, shape).astype(float),
            "eviction_error": rng.uniform(0, 0.5, shape),
        }  # fmt: skip
        out.append(HeadStatsMessage.build(header, stats))
    return out


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outage-seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=200.0, help="messages published per second")
    parser.add_argument("--queue-bytes", type=int, default=16 << 20)
    parser.add_argument("--producer-bytes", type=int, default=4 << 20)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)

    from collector.metrics import CollectorMetrics
    from collector.publish import KafkaSink
    from collector.schema import HeadStatsMessage
    from collector.settings import KafkaSettings

    pool = synthetic_messages(64)
    from headwatch.localstack.own_broker import OwnBroker
    from headwatch.localstack.paths import find_paths
    from headwatch.localstack.settings import StackSettings

    run_dir = Path(tempfile.mkdtemp(prefix="headwatch-outage-"))
    broker = OwnBroker(find_paths(StackSettings().cache_dir), run_dir)
    broker.start()
    metrics = CollectorMetrics()
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap, queue_max_bytes=args.queue_bytes, queue_max_messages=100_000,
        producer_buffer_bytes=args.producer_bytes, request_timeout_seconds=5.0, reconnect_backoff_seconds=0.5,
    )  # fmt: skip
    sink = KafkaSink(settings, metrics)
    stop = threading.Event()
    import numpy as np

    # Room for the whole run at the publish rate (warm-up, outage, restart), filled in place.
    latencies = np.zeros(int(args.rate * (args.outage_seconds + 600)) + 1)
    recorded = 0

    def load() -> None:
        nonlocal recorded
        i = 0
        while not stop.is_set():
            # A fresh message each time (new arrays), as the collector produces them.
            template = pool[i % len(pool)]
            fresh = HeadStatsMessage.build(
                template.header, {n: template.stat(n) for n in template.header.stat_names}
            )
            started = time.perf_counter()
            sink.publish(fresh)
            if recorded < latencies.shape[0]:
                latencies[recorded] = time.perf_counter() - started
                recorded += 1
            i += 1
            stop.wait(1.0 / args.rate)

    def published() -> float:
        return metrics.value("headwatch_collector_published_total", model_name="bench")

    tracemalloc.start()
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_for(lambda: published() > 100, 60)
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        broker.kill()
        killed_at = time.monotonic()
        peak_queue = peak_in_flight = peak_total = 0
        while time.monotonic() - killed_at < args.outage_seconds:
            queued, in_flight = sink.queued[1], sink.in_flight_bytes
            peak_queue = max(peak_queue, queued)
            peak_in_flight = max(peak_in_flight, in_flight)
            peak_total = max(peak_total, queued + in_flight)
            time.sleep(0.5)
        peak = tracemalloc.get_traced_memory()[1] - baseline
        at_restart = published()
        broker.start()
        resumed = wait_for(lambda: published() > at_restart + 100, 120)
    finally:
        stop.set()
        thread.join(5)
        sink.close()
        broker.stop()
        tracemalloc.stop()
    cap = args.queue_bytes + args.producer_bytes
    dropped = {
        r: metrics.value("headwatch_collector_dropped_total", model_name="bench", reason=r)
        for r in ("queue_full", "broker_unavailable", "closed")
    }
    result = {
        "outage_seconds": args.outage_seconds,
        "publish_rate_per_second": args.rate,
        "cap_bytes": cap,
        "peak_heap_growth_bytes": peak,
        "peak_queue_bytes": peak_queue,
        "peak_in_flight_charge_bytes": peak_in_flight,
        "peak_accounted_bytes": peak_total,
        "memory_over_cap_ratio": round(peak / cap, 3),
        # The tail includes GIL and garbage-collector pauses of the whole process, not broker waits.
        "p99_publish_seconds": round(float(np.quantile(latencies[:recorded], 0.99)), 6),
        "slowest_publish_seconds": round(float(latencies[:recorded].max()), 5),
        "published": published(),
        "dropped": dropped,
        "resumed": resumed,
    }
    stem = "collector_publisher_outage"
    if args.outage_seconds != 30.0:
        stem += f"_{args.outage_seconds:g}s"
    return report("collector_publisher_outage", result, args.save, file_stem=stem)


if __name__ == "__main__":
    sys.exit(main())
