"""Where messages go: Kafka (bounded queue, background thread), memory, or a JSON-lines file.

Usage:
    sink = KafkaSink(KafkaSettings(bootstrap_servers="127.0.0.1:9092"), metrics)
    sink.publish(message)     # never blocks: a full queue drops and counts
    sink.close()              # flushes within `flush_timeout_seconds`

The only module that touches Kafka (imported lazily, when the sink first connects). kafka-python
bounds neither its accumulator nor its wait for a missing broker, so the sink puts a queue bounded
by count and bytes in front of it, keeps at most `producer_buffer_bytes` unacknowledged inside it,
and bounds every blocking call. While no broker accepts a connection (at start, or once sends
fail) it holds no producer and probes with a plain TCP connection once per backoff: a producer
would reconnect on its own, each failed attempt holding a socket until the garbage collector
runs. MemorySink and FileSink live in collector.sinks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import Any

from collector.metrics import CollectorMetrics
from collector.schema import MAX_MESSAGE_BYTES, HeadStatsMessage
from collector.settings import KafkaSettings
from collector.sinks import FileSink, MemorySink, Sink, estimated_bytes, read_jsonl

__all__ = ["FileSink", "KafkaSink", "MemorySink", "Sink", "read_jsonl"]

logger = logging.getLogger(__name__)

_PRODUCER_COPIES = 3


def _accepts_connections(servers: list[str], timeout_seconds: float) -> bool:
    """Whether any bootstrap server accepts a TCP connection (closed at once)."""
    for server in servers:
        try:
            with socket.create_connection(host_port(server), timeout_seconds):
                return True
        except (OSError, ValueError):
            continue
    return False


def host_port(server: str) -> tuple[str, int]:
    """Return (host, port) of a bootstrap server: "host:port", "host" (port 9092), "[::1]:9092"."""
    server = server.strip()
    if server.startswith("[") and "]" in server:  # IPv6 in brackets, with or without a port
        host, _, rest = server[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 9092
    host, sep, port = server.rpartition(":")
    if not sep or ":" in host:  # no port, or a bare IPv6 address
        return server, 9092
    return host, int(port)


def _force_close(producer: Any) -> None:
    """Stop a producer that could not flush: its network thread, its connections, its batches.

    kafka-python 3 raises from `close()` when what it holds cannot be flushed (a broker away),
    before it stops its network thread, which then reconnects (a socket per attempt) for the
    life of the process, and retries the close, noisily, when the producer is collected. Its
    sender's own forced close fails the unsent batches (their callbacks count the drops); the
    close that follows then has nothing to flush.
    """
    sender = getattr(producer, "_sender", None)
    if sender is not None and hasattr(sender, "force_close"):
        sender.force_close()
        sender.join(1.0)
    try:
        producer.close(timeout=0)
    except Exception as exc:
        logger.warning("kafka producer did not close after its network thread stopped: %s", exc)


class KafkaSink:
    """Publishes messages to Kafka off the forward thread; drops and counts instead of blocking.

    Usage:
        sink = KafkaSink(KafkaSettings(), CollectorMetrics()); sink.publish(msg); sink.close()
    """

    def __init__(self, settings: KafkaSettings, metrics: CollectorMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else CollectorMetrics()
        self._queue: deque[tuple[HeadStatsMessage, int]] = deque()
        self._queued_bytes = 0
        self._in_flight_bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._producer: Any = None
        self._failed_attempts = 0  # connection attempts since the last success (logged once)
        self._failing_since: float | None = None  # the first failed send since the last success
        self._next_probe = 0.0
        # No producer: when to try to connect again. Only time brings it nearer: a publish wakes
        # the thread, and would otherwise make it probe once per message through an outage.
        self._next_attempt = 0.0
        self._thread = threading.Thread(target=self._run, name="headwatch-publisher", daemon=True)
        self._thread.start()

    def publish(self, message: HeadStatsMessage) -> None:
        """Queue a message; drop it (counted) when the queue is full or the sink is closed."""
        size = estimated_bytes(message)
        name = message.header.model_name
        with self._cond:
            if self._closing:
                reason = "closed"
            elif (
                len(self._queue) >= self.settings.queue_max_messages
                or self._queued_bytes + size > self.settings.queue_max_bytes
            ):
                reason = "queue_full"
            else:
                self._queue.append((message, size))
                self._queued_bytes += size
                self._gauges()
                self._cond.notify()
                return
        self.metrics.drop(name, reason)

    @property
    def queued(self) -> tuple[int, int]:
        """Return (messages, bytes) waiting in the queue."""
        with self._cond:
            return len(self._queue), self._queued_bytes

    @property
    def in_flight_bytes(self) -> int:
        """Return the bytes handed to the producer and not yet acknowledged or failed."""
        with self._cond:
            return self._in_flight_bytes

    def _gauges(self) -> None:
        """Set the queue gauges (under the lock): one queue for every model this sink serves."""
        self.metrics.queue_messages.set(len(self._queue))
        self.metrics.queue_bytes.set(self._queued_bytes)

    def _connect(self) -> bool:
        from kafka import KafkaProducer

        s = self.settings
        timeout_ms = int(s.request_timeout_seconds * 1000)
        options: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap_servers.split(","),
            "acks": int(s.acks) if s.acks != "all" else "all",
            "compression_type": None if s.compression_type == "none" else s.compression_type,
            "max_block_ms": timeout_ms,
            "request_timeout_ms": timeout_ms,
            "delivery_timeout_ms": 3 * timeout_ms,
            "reconnect_backoff_ms": int(s.reconnect_backoff_seconds * 1000),
            "reconnect_backoff_max_ms": int(s.reconnect_backoff_seconds * 5000),
            "max_request_size": MAX_MESSAGE_BYTES + 4096,
            "linger_ms": 20,
            "retries": 3,
        }
        defaults = KafkaProducer.DEFAULT_CONFIG
        if "bootstrap_timeout_ms" in defaults:  # kafka-python 3: else 30 s per attempt
            options["bootstrap_timeout_ms"] = timeout_ms
        # A producer that finds no broker raises without closing what it opened: the sockets of
        # its connection attempts (one per reconnect backoff) stay open until the garbage
        # collector finds them. Through a long outage that is thousands of descriptors in the
        # serving process, so no producer is made while no bootstrap server accepts a connection,
        # and the clients of one that still fails are closed.
        if not _accepts_connections(options["bootstrap_servers"], s.request_timeout_seconds):
            self._unavailable("no bootstrap server accepts a connection")
            return False
        made: list[Any] = []
        if "kafka_client" in defaults:
            make = defaults["kafka_client"]

            def client(**configs: Any) -> Any:
                made.append(make(**configs))
                return made[-1]

            options["kafka_client"] = client
        try:
            self._producer = KafkaProducer(**options)
        except Exception as exc:
            for failed in made:
                try:
                    failed.close()
                except Exception:  # closing what never connected: nothing more to free
                    logger.debug("closing a failed kafka client", exc_info=True)
            self._unavailable(str(exc))
            return False
        logger.info(
            "kafka producer connected to %s topic=%s after %d failed attempts",
            s.bootstrap_servers, s.topic, self._failed_attempts,
        )  # fmt: skip
        self._failed_attempts = 0
        return True

    def _unavailable(self, why: str) -> None:
        """Log the first failed attempt of an outage as a warning, the rest (one per backoff) at debug."""
        self._failed_attempts += 1
        level = logging.WARNING if self._failed_attempts == 1 else logging.DEBUG
        logger.log(
            level,
            "kafka brokers %s unavailable (%s); retrying every %g s; messages queue, "
            "then drop (counted)",
            self.settings.bootstrap_servers, why, self.settings.reconnect_backoff_seconds,
        )  # fmt: skip

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    if not self._queue:
                        self._cond.wait()
                        continue
                    backoff = 0.0
                    if self._producer is None:
                        backoff = self._next_attempt - time.monotonic()
                    if backoff <= 0:
                        break
                    self._cond.wait(backoff)
                if self._closing:
                    return
            if self._producer is not None and self._brokers_gone():
                self._drop_producer()
            if self._producer is None and not self._connect():
                self._next_attempt = time.monotonic() + self.settings.reconnect_backoff_seconds
                continue
            self._send_one()

    def _brokers_gone(self) -> bool:
        """Whether sends fail and no bootstrap server accepts a connection (probed once per backoff)."""
        with self._cond:
            failing = self._failing_since is not None
        now = time.monotonic()
        if not failing or now < self._next_probe:
            return False
        self._next_probe = now + self.settings.reconnect_backoff_seconds
        servers = self.settings.bootstrap_servers.split(",")
        return not _accepts_connections(servers, self.settings.request_timeout_seconds)

    def _drop_producer(self) -> None:
        """Close a producer whose brokers are gone; `_connect` makes a new one when one answers.

        Left alone, kafka-python reconnects once per backoff, and each failed attempt holds its
        socket until the garbage collector runs: through a long outage, thousands of descriptors
        in the serving process. Its unsent batches fail (counted as drops).
        """
        logger.info("kafka brokers %s gone: closing the producer", self.settings.bootstrap_servers)
        _force_close(self._producer)
        self._producer = None
        with self._cond:
            self._failing_since = None

    def _send_one(self) -> None:
        with self._cond:
            while (
                self._in_flight_bytes >= self.settings.producer_buffer_bytes and not self._closing
            ):
                self._cond.wait(0.1)
            if not self._queue:
                return
            # The message leaves the queue but stays charged to it until its in-flight charge is
            # taken: while it is encoded it is still held, so the count never dips below reality.
            message, size = self._queue.popleft()
        name = message.header.model_name
        key = message.header.model_key.encode()
        try:
            data = message.to_bytes()
        except Exception:
            logger.warning("cannot encode a message of %s", name, exc_info=True)
            self._release_queued(size)
            self.metrics.drop(name, "too_large")
            return
        del message
        if len(data) > MAX_MESSAGE_BYTES:
            self._release_queued(size)
            self.metrics.drop(name, "too_large")
            return
        # Until the send settles kafka-python holds the value, the record batch it was copied into
        # and, with compression on, the compressed batch: three copies.
        charge = _PRODUCER_COPIES * len(data)
        with self._cond:
            self._in_flight_bytes += charge
        self._release_queued(size)
        try:
            future = self._producer.send(self.settings.topic, key=key, value=data)
        except Exception as exc:
            self._settle(charge, name, ok=False, exc=exc)
            return
        del data  # the callbacks hold only the size
        future.add_callback(lambda _meta: self._settle(charge, name, ok=True))
        future.add_errback(lambda exc: self._settle(charge, name, ok=False, exc=exc))

    def _release_queued(self, size: int) -> None:
        with self._cond:
            self._queued_bytes -= size
            self._gauges()

    def _settle(self, size: int, name: str, ok: bool, exc: BaseException | None = None) -> None:
        with self._cond:
            self._in_flight_bytes -= size
            if ok:
                self._failing_since = None
            elif self._failing_since is None:
                self._failing_since = time.monotonic()
            self._cond.notify_all()
        if ok:
            self.metrics.published.labels(model_name=name).inc()
        else:
            logger.debug("kafka send failed: %s", exc)
            self.metrics.drop(name, "broker_unavailable")

    def close(self, timeout_seconds: float | None = None) -> None:
        """Send what is queued, flush within the bound, drop (counted) whatever is left."""
        timeout = (
            self.settings.flush_timeout_seconds if timeout_seconds is None else timeout_seconds
        )
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
        while time.monotonic() < deadline and self._producer is not None:
            with self._cond:
                if not self._queue:
                    break
            time.sleep(0.01)
        with self._cond:
            self._closing = True
            left = list(self._queue)
            self._queue.clear()
            # Only what is dropped here: a message being encoded releases its own bytes.
            self._queued_bytes -= sum(size for _, size in left)
            self._gauges()
            self._cond.notify_all()
        for message, _ in left:
            self.metrics.drop(message.header.model_name, "closed")
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self._producer is not None:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                self._producer.flush(timeout=remaining)
            except Exception as exc:
                logger.warning("kafka flush did not complete: %s", exc)
            try:
                self._producer.close(timeout=max(remaining, 0.5))
            except Exception as exc:
                logger.warning("kafka producer close failed: %s; closing it without sending", exc)
                _force_close(self._producer)
            self._producer = None
