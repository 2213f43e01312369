"""Messages per second one exporter process consumes, decodes, validates and aggregates.

Usage:
    python benchmarks/exporter_throughput.py [--bootstrap HOST:PORT] [--messages 12000] [--save]

32 layers x 32 heads messages (4 models keyed by identity over 4 partitions) are produced to a
fresh topic and read once by a plain consumer, neither timed (the read warms a freshly started
broker's fetch path, which a cold JVM compiles on the cores the exporter runs on;
`--cold-broker` skips it). Then the exporter's own ConsumerService (what `headwatch exporter
serve` runs) consumes them with a fresh group, committing as it goes. Reported from one run:
messages/s and head-updates/s end to end from the real broker, with the process CPU time per
message and the load average while it ran (the machines are shared: the CPU figure is the one
other processes do not inflate); the decode and fold time per message measured offline on the
same messages with full windows, in wall and CPU time (so the share of each is visible); and the
process RSS half way vs at the end, and the windows' own size (state is O(models x heads x
window), so it must not grow with the messages consumed).
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

from _exporter_common import (
    broker,
    create_topic,
    produce_raw,
    read_all,
    report,
    rss_mib,
    run_service,
    service_settings,
)


def _fold_offline(agg: Any, values: list[bytes]) -> None:
    from exporter.aggregate import Fold

    now = time.time()  # the messages are stamped a minute ago: what a live replica sees
    for start in range(0, len(values), 250):  # the consumer's poll batches
        chunk: list[bytes | None] = list(values[start : start + 250])
        outcomes = agg.fold_records(chunk, partition=0, replay=[False] * len(chunk), now_wall=now)
        refused = [o for o, _ in outcomes if o is not Fold.FOLDED]
        if refused:  # a fold split that timed rejections would be no fold split
            raise RuntimeError(f"expected every offline message folded, got {refused[0]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="a running broker (default: start one)")
    parser.add_argument("--messages", type=int, default=12000)
    parser.add_argument(
        "--cold-broker",
        action="store_true",
        help="skip reading the topic once before the timed run (the broker's JIT warm-up)",
    )
    parser.add_argument(
        "--save", action="store_true", help="write benchmarks/results/exporter_throughput.json"
    )
    args = parser.parse_args()
    if args.messages < 4000:
        parser.error("--messages must be at least 4000 (the offline split uses the first 4,000)")
    from collector.schema import HeadStatsMessage
    from exporter.aggregate import Aggregator
    from exporter.model_state import AggregatePolicy
    from tests.factories import MessageFactory, pattern_probs

    models = [
        MessageFactory(
            layers=32,
            heads=32,
            kv_heads=8,
            model_name=f"bench-{i}",
            seed=i,
            probs=pattern_probs(32, 32, [1, 4, 1, 1, 1, 1, 1]),
        )
        for i in range(4)
    ]
    now = time.time()
    messages = [
        models[i % 4].message(timestamp_seconds=now - 60 + i * 1e-3) for i in range(args.messages)
    ]
    raw = [m.to_bytes() for m in messages]
    records = [
        (m.model_key.encode(), b, int(m.timestamp_seconds * 1000))
        for m, b in zip(messages, raw, strict=True)
    ]

    # Offline split of the per-message cost on the same bytes, with the windows full as they are
    # end to end: the first 2,000 messages fill the four 512-row windows, the next 2,000 are
    # timed. Wall time and this thread's CPU time (the machines are shared; CPU time is what
    # other processes do not inflate).
    warm, sample = raw[:2000], raw[2000:4000]
    wall, cpu = time.perf_counter(), time.thread_time()
    decoded = [HeadStatsMessage.from_bytes(b) for b in sample]
    decode_ms = (time.perf_counter() - wall) / len(sample) * 1000
    decode_cpu_ms = (time.thread_time() - cpu) / len(sample) * 1000
    agg = Aggregator(AggregatePolicy())
    _fold_offline(agg, warm)
    wall, cpu = time.perf_counter(), time.thread_time()
    _fold_offline(agg, sample)
    fold_ms = (time.perf_counter() - wall) / len(sample) * 1000 - decode_ms
    fold_cpu_ms = (time.thread_time() - cpu) / len(sample) * 1000 - decode_cpu_ms
    del decoded, agg

    with broker(args.bootstrap) as bootstrap:
        topic = f"bench-throughput-{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, topic, 4)
        produce_seconds = produce_raw(bootstrap, topic, records)
        warm_up_seconds = 0.0 if args.cold_broker else read_all(bootstrap, topic)
        del records, raw, messages
        service, stop, thread = run_service(
            service_settings(bootstrap, topic, f"bench-{uuid.uuid4().hex[:8]}")
        )
        try:
            first_at = rss_full = None
            while True:
                consumed = service.stats().messages_total
                if first_at is None and consumed > 0:
                    first_at, first_count = time.perf_counter(), consumed
                    first_cpu, load_start = time.process_time(), os.getloadavg()[0]
                if rss_full is None and consumed >= args.messages // 2:
                    # every window (4 x 512 samples) is full and fetch buffers are in steady state
                    rss_full = rss_mib()
                if consumed >= args.messages:
                    elapsed = time.perf_counter() - first_at  # type: ignore[operator]
                    cpu_seconds = time.process_time() - first_cpu
                    load_end = os.getloadavg()[0]
                    break
                if not thread.is_alive():
                    raise SystemExit("the consumer stopped")
                time.sleep(0.01)
            rss_end = rss_mib()
            invalid = service.stats().invalid
            if any(invalid.values()):  # rejections are cheaper than folds: no throughput figure
                raise SystemExit(f"expected every message folded, got rejections {invalid}")
            state_mib = (
                sum(
                    a.nbytes
                    for st in service.aggregator.models.values()
                    for a in vars(st.window).values()
                    if hasattr(a, "nbytes")
                )
                / 2**20
            )
        finally:
            stop.set()
            thread.join(timeout=30)
    rate = (args.messages - first_count) / elapsed
    cpu_ms = cpu_seconds / (args.messages - first_count) * 1000
    result = {
        "layers": 32,
        "heads": 32,
        "message_bytes": len(sample[0]),
        "messages": args.messages,
        "produce_seconds": round(produce_seconds, 1),
        "broker_warm_up_seconds": round(warm_up_seconds, 1),
        "messages_per_second": round(rate),
        "head_updates_per_second": round(rate * 1024),
        "load_average_1m_during": [round(load_start, 2), round(load_end, 2)],
        "process_cpu_ms_per_message": round(cpu_ms, 3),
        "messages_per_process_cpu_second": round(1000 / cpu_ms),
        "decode_ms_per_message": round(decode_ms, 3),
        "fold_ms_per_message": round(fold_ms, 3),
        "decode_cpu_ms_per_message": round(decode_cpu_ms, 3),
        "fold_cpu_ms_per_message": round(fold_cpu_ms, 3),
        "decode_share_of_end_to_end": round(decode_ms / (1000 / rate), 2),
        "offline_messages_per_second": round(1000 / (decode_ms + fold_ms)),
        "offline_messages_per_cpu_second": round(1000 / (decode_cpu_ms + fold_cpu_ms)),
        "window_state_mib": round(state_mib, 1),
        "rss_mib_half_way": round(rss_full or 0, 1),
        "rss_mib_end": round(rss_end, 1),
        "rss_growth_mib": round(rss_end - (rss_full or rss_end), 1),
    }
    return report("exporter_throughput", result, args.save)


if __name__ == "__main__":
    raise SystemExit(main())
