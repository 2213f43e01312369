"""Sinks that need no broker: memory (tests, the demo) and a JSON-lines file (offline use).

Usage:
    sink = FileSink("stats.jsonl"); sink.publish(message); read_jsonl("stats.jsonl")
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from collector.schema import HeadStatsMessage, MessageHeader


class Sink(Protocol):
    """Receives finished messages; `publish` must return quickly and never raise."""

    def publish(self, message: HeadStatsMessage) -> None: ...

    def close(self, timeout_seconds: float | None = None) -> None: ...


class MemorySink:
    """Keeps every message in `messages` (tests, the demo).

    Usage:
        sink = MemorySink(); ...; sink.messages[0].stat("entropy_nats")
    """

    def __init__(self) -> None:
        self.messages: list[HeadStatsMessage] = []
        self._lock = threading.Lock()

    def publish(self, message: HeadStatsMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def close(self, timeout_seconds: float | None = None) -> None:
        return None


def message_to_json(message: HeadStatsMessage) -> dict[str, Any]:
    """Return a JSON-ready dict: the header and each statistic as nested lists (null = not measured)."""
    stats = {}
    for name in message.header.stat_names:
        values = message.stat(name)
        stats[name] = [[None if math.isnan(v) else v for v in row] for row in values.tolist()]
    return {"header": message.header.model_dump(mode="json"), "stats": stats}


def message_from_json(data: dict[str, Any]) -> HeadStatsMessage:
    """Return the message a `message_to_json` dict describes."""
    header = MessageHeader.model_validate(data["header"])
    stats = {
        n: np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
        for n, rows in data["stats"].items()
    }
    return HeadStatsMessage.build(header, stats)


def read_jsonl(path: str | Path) -> list[HeadStatsMessage]:
    """Return every message of a JSON-lines file written by FileSink."""
    with open(path, encoding="utf-8") as handle:
        return [message_from_json(json.loads(line)) for line in handle if line.strip()]


class FileSink:
    """Appends one JSON object per message to a file (offline use); writes are line-buffered.

    Usage:
        sink = FileSink("stats.jsonl"); ...; read_jsonl("stats.jsonl")
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._handle: Any = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def publish(self, message: HeadStatsMessage) -> None:
        line = json.dumps(message_to_json(message), separators=(",", ":"))
        with self._lock:
            if self._handle is None:
                return
            self._handle.write(line + "\n")
            self._handle.flush()

    def close(self, timeout_seconds: float | None = None) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


def estimated_bytes(message: HeadStatsMessage) -> int:
    """Return the memory a queued message holds: its float64 arrays, validity mask and header,
    with the opt-in middle-key positions (a pointer and an int object each, about 40 bytes).

    An upper bound of the encoded size too (4 bytes a cell before compression; 6 or so a middle
    position in the JSON header), so a queue bounded by this number bounds both the memory and
    what the producer is handed.
    """
    h = message.header
    cells = h.num_layers * h.num_query_heads
    positions = sum(len(head) for layer in h.top_middle_positions or () for head in layer)
    return 4096 + cells * (8 * len(h.stat_names) + 1) + 40 * positions
