"""`headwatch demo`: the bundled model, the real collector and the exporter's aggregation in one process.

Usage:
    headwatch demo                       # about a minute on 2 CPU cores; /metrics on 127.0.0.1:9464
    headwatch demo --serve --port 9500   # keep /metrics up until Ctrl-C
    headwatch demo --kafka 127.0.0.1:9092   # publish to a real broker; `headwatch exporter` consumes

Runs long-context requests (needle-in-a-haystack prompts and plain documents of varied lengths)
through the bundled model with the collector attached, folds every message into the exporter's
aggregation in-process, serves its /metrics on 127.0.0.1 while it runs, prints the layer x head
pattern map and the study-style table, and writes a report folder (figures, index.html,
heads.json, a compression policy). Verdicts use the exporter's rule with a minimum of one sample
per head: with few samples its upper confidence bound of the p95 is the largest error seen.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from collector.errors import CollectorError
from headwatch.demo_kafka import KafkaPublisher
from headwatch.report.errors import HeadwatchToolError, PortInUseError
from headwatch.settings_errors import invalid_settings

logger = logging.getLogger(__name__)

DEFAULT_REQUESTS = 12
DEFAULT_CONTEXT_TOKENS = 2048


class LiveAggregation:
    """The exporter's Aggregator behind a lock, fed by the collector's sink, scraped by /metrics.

    Usage:
        live = LiveAggregation(settings.aggregate_policy())
        live.publish(message)   # the Sink protocol: called on the forward thread
    """

    def __init__(self, policy: Any, forward_to: Any = None) -> None:
        from exporter.aggregate import Aggregator

        self._lock = threading.Lock()
        self.aggregator = Aggregator(policy)
        self.forward_to = forward_to
        self.messages: list[Any] = []
        self.folded = 0

    def publish(self, message: Any) -> None:
        """Keep the message; fold it in-process, or hand it to the Kafka sink in --kafka mode."""
        with self._lock:
            self.messages.append(message)
            if self.forward_to is not None:
                self.forward_to.publish(message)
                return
            self.aggregator.fold(message, partition=0, replay=False, now_wall=time.time())
            self.folded += 1

    def snapshots(self) -> list[Any]:
        """Return the exporter's per-model snapshots with up-to-date verdicts."""
        with self._lock:
            for state in self.aggregator.models.values():
                state.evaluate_verdicts()
            return self.aggregator.snapshot()

    def scrape_view(self) -> tuple[list[Any], Any]:
        """Return what the exporter's Prometheus collector renders at one scrape."""
        from exporter.metrics import ExporterStats

        snapshots = self.snapshots()
        stats = ExporterStats(messages_total=self.folded, last_message_wall=time.time())
        return snapshots, stats


def serve_metrics(live: LiveAggregation, host: str, port: int, limits: Any) -> Any:
    """Serve the exporter's metrics of `live` on http://host:port/metrics; return the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    from exporter.metrics import HeadwatchCollector

    registry = CollectorRegistry()
    registry.register(HeadwatchCollector(live.scrape_view, limits))
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"expected port {port} on {host} to be free for /metrics, got it in use; "
                f"pass --port with another port"
            ) from exc
        raise PortInUseError(f"expected to serve /metrics on {host}:{port}, got {exc}") from exc
    return server


def exporter_settings(port: int | None) -> Any:
    """Return ExporterSettings for the in-process aggregation (env vars apply, as in the exporter)."""
    from exporter.settings import ExporterSettings

    base = ExporterSettings()
    overrides: dict[str, Any] = {
        "verdicts": {**base.verdicts.model_dump(), "min_samples": 1},
        "window": {**base.window.model_dump(), "evaluate_every_samples": 1},
    }
    if port is not None:
        overrides["http"] = {**base.http.model_dump(), "port": port}
    return ExporterSettings(**overrides)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwatch demo", description=__doc__.split("\n")[0])
    p.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"long-context requests to run (default {DEFAULT_REQUESTS})",
    )
    p.add_argument(
        "--context-tokens",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help=f"longest prompt in tokens; others are 3/4 and 1/2 of it (default {DEFAULT_CONTEXT_TOKENS})",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="/metrics port on 127.0.0.1 (default: the exporter's, 9464)",
    )
    p.add_argument(
        "--serve", action="store_true", help="keep /metrics up after the run until Ctrl-C"
    )
    p.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        default=None,
        help="publish to this Kafka broker instead of folding in-process",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="report folder (default ./reports/demo-<time>/)"
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local HF causal-LM directory instead of the bundled model",
    )
    p.add_argument("--recent-tokens", type=int, default=None, help="R (default 64)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    return p


def run(args: argparse.Namespace, settings: Any) -> int:
    """Run the demo with parsed arguments and its ExporterSettings; return the exit status."""
    from exporter.patterns import PATTERNS
    from headwatch.analyze import (
        RECENT_TOKENS,
        SINK_TOKENS,
        fit_context,
        load_model,
        max_context,
        measure,
        prompt_maker,
    )
    from headwatch.report.build import build_report, default_out
    from headwatch.report.by_kind import maps_by_kind
    from headwatch.report.html import check_report_folder
    from headwatch.report.summary import summarize
    from headwatch.report.table import markdown_table, pattern_map_text, study_rows

    started = time.perf_counter()
    out = args.out or default_out("demo")
    check_report_folder(out)
    recent = RECENT_TOKENS if args.recent_tokens is None else args.recent_tokens
    # --kafka: fail before loading the model when no broker answers.
    publisher = KafkaPublisher.connect(args.kafka) if args.kafka else None
    live = LiveAggregation(
        settings.aggregate_policy(), publisher.sink if publisher is not None else None
    )
    server = None
    if args.kafka is None:
        from exporter.metrics import SeriesLimits

        limits = SeriesLimits(**settings.metrics.model_dump())
        server = serve_metrics(live, settings.http.host, settings.http.port, limits)
        print(
            f"/metrics: http://{settings.http.host}:{settings.http.port}/metrics", file=sys.stderr
        )
    try:
        model, tokenizer, loaded_name = load_model(args.model, args.device)
        # --kafka: HEADWATCH_COLLECTOR_MODEL_NAME names the model, as for any attached collector.
        name = (publisher.model_name if publisher is not None else "") or loaded_name
        maker = prompt_maker(tokenizer)
        prompts = fit_context(
            maker.mixed(args.requests, args.context_tokens, args.seed),
            max_context(model),
            truncate=False,
            has_truncate_flag=False,
        )
        metrics = publisher.metrics if publisher is not None else None
        measure(model, prompts, name, SINK_TOKENS, recent, sink=live, metrics=metrics)
        if not live.messages:
            raise HeadwatchToolError("expected head-stats messages from the collector, got none")
        if args.kafka:
            summary = summarize(
                live.messages,
                verdict_source="exporter rules on these samples (local copy; published to Kafka)",
            )
        else:
            (snap,) = [s for s in live.snapshots() if s.model_name == name]
            summary = summarize(
                live.messages,
                patterns=np.asarray(PATTERNS, dtype=object)[snap.pattern],
                safe_kv_heads=snap.kv_safe,
                verdict_source="exporter aggregation, in-process",
                verdict_bound=settings.verdicts.enter_bound,
            )
        print(pattern_map_text(summary))
        by_kind = maps_by_kind(prompts, live.messages)
        if by_kind:
            print(f"\nThe same heads by kind of request:\n{by_kind}")
        print()
        print(markdown_table(study_rows(summary)))
        needle = next((p for p in prompts if p.has_needle), prompts[0])
        facts = {
            "model": name,
            "requests": f"{len(prompts)} ({sum(p.has_needle for p in prompts)} needle-in-a-haystack, the rest plain documents; {min(len(p.ids) for p in prompts):,}-{max(len(p.ids) for p in prompts):,} tokens)",
            "haystack text": maker.source,
            "transport": f"Kafka at {args.kafka}, topic {publisher.topic}"
            if publisher is not None
            else "in-memory, folded by the exporter's aggregation in-process",
        }
        build_report(out, f"headwatch demo: {name}", summary, model, needle, facts)
        print(f"\nreport: {out}/index.html  ({time.perf_counter() - started:.1f} s)")
        print(
            f"policy: {out}/policy/policy.json and {out}/policy/duo_attention/ (docs/policy-format.md)"
        )
        if publisher is not None:
            sent = len(live.messages)
            acknowledged = publisher.close_and_check(name, sent, timeout_seconds=10.0)
            print(
                f"published {acknowledged} of {sent} messages to {args.kafka} (topic {publisher.topic}); "
                "run `headwatch exporter` to serve them"
            )
        if args.serve and server is not None:
            print(
                f"serving /metrics on http://{settings.http.host}:{settings.http.port}/metrics until Ctrl-C"
            )
            _wait_for_interrupt()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()  # shutdown only stops serving: this frees the port
        if publisher is not None:
            publisher.close(timeout_seconds=1.0)  # after close_and_check: already closed, a no-op
    return 0


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopped serving /metrics", file=sys.stderr)


def main(argv: list[str]) -> int:
    """Run `headwatch demo`; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python logs every connection
    if args.requests < 1 or args.context_tokens < 128:
        print(
            f"headwatch demo: expected --requests >= 1 and --context-tokens >= 128, got {args.requests} and {args.context_tokens}",
            file=sys.stderr,
        )
        return 2
    # The report's compression policy keeps sink + recent keys: it needs at least one recent key.
    if args.recent_tokens is not None and args.recent_tokens < 1:
        print(
            f"headwatch demo: expected --recent-tokens >= 1, got {args.recent_tokens}",
            file=sys.stderr,
        )
        return 2
    if args.serve and args.kafka:
        print(
            "headwatch demo: expected --serve or --kafka, got both; with --kafka, "
            "`headwatch exporter` serves /metrics from the topic",
            file=sys.stderr,
        )
        return 2
    try:
        settings = exporter_settings(args.port)
    except ValidationError as exc:  # --port or a HEADWATCH_EXPORTER_* variable out of its domain
        for line in invalid_settings(exc):
            print(f"headwatch demo: {line}", file=sys.stderr)
        return 2
    try:
        return run(args, settings)
    except (HeadwatchToolError, CollectorError) as exc:  # HEADWATCH_COLLECTOR_*, the model
        print(f"headwatch demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headwatch demo: interrupted; no report was written", file=sys.stderr)
        return 130
