"""The `headwatch exporter` command: serve metrics from Kafka, or ask for a new drift reference.

Usage:
    headwatch exporter serve                       # the default; settings from HEADWATCH_EXPORTER_*
    headwatch exporter rebaseline --model NAME [--config-hash HASH]

Exit status: 0 on a clean stop (SIGTERM/SIGINT), 2 on bad settings or arguments,
3 when the broker is unreachable at start-up or refuses this client.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

from pydantic import ValidationError

logger = logging.getLogger(__name__)

EXIT_BAD_CONFIG = 2
EXIT_BROKER = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwatch exporter",
        description="Consume head statistics from Kafka and serve Prometheus metrics.",
    )
    parser.set_defaults(port=None)  # no subcommand means `serve` with its defaults
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="consume and serve /metrics and /healthz (default)")
    serve.add_argument("--port", type=int, help="override HEADWATCH_EXPORTER_HTTP__PORT")
    rebase = sub.add_parser("rebaseline", help="drop a model's drift reference and take a new one")
    rebase.add_argument("--model", required=True, help="model_name as the collector reports it")
    rebase.add_argument(
        "--config-hash", help="only this identity (default: every identity of the model)"
    )
    sub.add_parser("settings", help="print the effective settings as JSON (secrets masked)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the exporter command line; return the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from exporter.settings import ExporterSettings

    try:
        settings = ExporterSettings()
    except ValidationError as exc:
        print(f"headwatch exporter: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    command = args.command or "serve"
    if command == "settings":
        print(settings.model_dump_json(indent=2))
        return 0
    from kafka.errors import KafkaError

    from exporter.errors import BrokerUnavailableError, ModelNotFoundError

    try:
        if command == "rebaseline":
            try:
                return _rebaseline(settings, args.model, args.config_hash)
            except KafkaError as exc:
                print(
                    f"headwatch exporter: re-baseline request not written: {exc!r}", file=sys.stderr
                )
                return EXIT_BROKER
        return _serve(settings, args.port)
    except BrokerUnavailableError as exc:
        logger.error("broker unavailable: %s", exc)
        return EXIT_BROKER
    except ModelNotFoundError as exc:
        print(f"headwatch exporter: {exc}", file=sys.stderr)
        return 1


def _rebaseline(settings: Any, model: str, config_hash: str | None) -> int:
    from exporter.kafka_clients import ensure_topics, make_producer
    from exporter.refstore import ReferenceStore

    ensure_topics(settings.kafka)
    producer = make_producer(settings.kafka)
    store = ReferenceStore(settings.kafka, producer)
    try:
        key = store.request_rebaseline(model, config_hash, time.time())
    finally:
        store.close()
        producer.close()
    print(f"re-baseline requested for {key}; the owning replica builds a new reference from now on")
    return 0


def _serve(settings: Any, port: int | None) -> int:
    from prometheus_client.registry import CollectorRegistry

    from exporter.consume import ConsumerService
    from exporter.http import MetricsServer
    from exporter.metrics import HeadwatchCollector, SeriesLimits

    service = ConsumerService(settings.kafka, settings.aggregate_policy())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        HeadwatchCollector(service.scrape_view, SeriesLimits(**settings.metrics.model_dump()))
    )
    stall = settings.http.stall_seconds

    def health() -> tuple[bool, dict[str, Any]]:
        facts = service.health()
        age = facts.get("loop_age_seconds")
        return bool(facts["alive"] and age is not None and age < stall), facts

    server = MetricsServer(
        settings.http.host, settings.http.port if port is None else port, registry, health
    )
    server.start()
    logger.info("serving /metrics and /healthz on %s:%d", settings.http.host, server.port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.run(stop)
    finally:
        server.stop()
    return 0
