"""How long a restarted exporter takes to rebuild a 1-hour window at 10 messages/s from Kafka.

Usage:
    python benchmarks/exporter_rebuild.py [--bootstrap HOST:PORT] [--rate 10] [--hours 1] [--save]

One model of 32 layers x 32 heads sends `rate` messages/s for `hours`: the messages are produced
with producer timestamps spread over the last hour (not timed). A group then commits the end
offsets, as a replica that had consumed everything would have. A new ConsumerService with that
group starts: it seeks back one horizon by timestamp (offsets_for_times) and replays up to the
committed offset. Reported: the exporter's own rebuild time (headwatch_exporter_rebuild_seconds),
the messages replayed and the replay rate, the process CPU time from the service's start to the
end of the rebuild with the load average meanwhile (the machines are shared), and that the
rebuilt window holds what it should.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

from _exporter_common import (
    broker,
    create_topic,
    produce_raw,
    report,
    run_service,
    service_settings,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="a running broker (default: start one)")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument(
        "--save", action="store_true", help="write benchmarks/results/exporter_rebuild.json"
    )
    args = parser.parse_args()
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from tests.factories import MessageFactory, pattern_probs

    horizon = 3600.0 * args.hours
    count = int(horizon * args.rate)
    factory = MessageFactory(
        layers=32, heads=32, kv_heads=8, probs=pattern_probs(32, 32, [1, 4, 1, 1, 1, 1, 1]), seed=0
    )
    start = time.time() - horizon + 60  # the oldest message is a minute inside the horizon
    with broker(args.bootstrap) as bootstrap:
        topic = f"bench-rebuild-{uuid.uuid4().hex[:8]}"
        group = f"bench-{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, topic, 1)
        produce_seconds = 0.0
        for first in range(0, count, 3000):  # build and send in slices to keep memory flat
            batch = [
                factory.message(timestamp_seconds=start + i / args.rate)
                for i in range(first, min(count, first + 3000))
            ]
            produce_seconds += produce_raw(
                bootstrap,
                topic,
                [
                    (m.model_key.encode(), m.to_bytes(), int(m.timestamp_seconds * 1000))
                    for m in batch
                ],
            )
        committer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        tp = TopicPartition(topic, 0)
        end = committer.end_offsets([tp])[tp]
        committer.commit({tp: OffsetAndMetadata(end, "", -1)})
        committer.close()
        settings = service_settings(bootstrap, topic, group, max_poll_records=500)
        cpu, load_start = time.process_time(), os.getloadavg()[0]
        service, stop, thread = run_service(settings)
        try:
            while service.stats().rebuild_seconds == 0.0 or service.health()["rebuilding"]:
                if not thread.is_alive():
                    raise SystemExit("the consumer stopped")
                time.sleep(0.05)
            rebuild = service.stats().rebuild_seconds
            cpu, load_end = time.process_time() - cpu, os.getloadavg()[0]
            snapshot = service.scrape_view()[0]
        finally:
            stop.set()
            thread.join(timeout=30)
    result = {
        "layers": 32,
        "heads": 32,
        "window_hours": args.hours,
        "rate_per_second": args.rate,
        "messages_replayed": count,
        "produce_seconds": round(produce_seconds, 1),
        "rebuild_seconds": round(rebuild, 2),
        "replay_messages_per_second": round(count / rebuild),
        "load_average_1m_during": [round(load_start, 2), round(load_end, 2)],
        "process_cpu_seconds": round(cpu, 2),
        "window_samples_after": snapshot[0].window_samples if snapshot else 0,
        "counted_again": snapshot[0].messages_total if snapshot else None,
    }
    return report("exporter_rebuild", result, args.save)


if __name__ == "__main__":
    raise SystemExit(main())
