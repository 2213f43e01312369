"""Drift references and re-baseline requests, and their encoding in the compacted reference topic.

Usage:
    record = decode_record(key, value)  # Reference | RebaselineRequest
    value = reference.to_bytes()

A reference is the distribution of pattern labels and normalised-entropy bins per head over a
model's first `reference_samples` rows (or those after a re-baseline). It is keyed by model
identity (`name@config_hash`) in a compacted topic, so the newest record per identity survives
restarts. A re-baseline request carries its time; a reference counts only if it was created
after the newest request that applies to it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.errors import ReferenceRecordError
from exporter.patterns import NUM_PATTERNS
from exporter.window import ENTROPY_BINS

_FORMAT = 1
_MAX_RECORD_BYTES = 64 << 20


@dataclass(frozen=True)
class Reference:
    """A frozen per-head reference: pattern counts (L, H, 7) and entropy-bin counts (L, H, 10)."""

    model_key: str
    model_name: str
    samples: int
    created_seconds: float
    pattern_counts: np.ndarray
    entropy_counts: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """Return (layers, heads)."""
        layers, heads, _ = self.pattern_counts.shape
        return layers, heads

    def to_bytes(self) -> bytes:
        """Return the record value: zlib-compressed JSON."""
        layers, heads = self.shape
        body = {
            "kind": "reference",
            "format": _FORMAT,
            "model_key": self.model_key,
            "model_name": self.model_name,
            "samples": self.samples,
            "created_seconds": self.created_seconds,
            "layers": layers,
            "heads": heads,
            "pattern_counts": self.pattern_counts.astype(np.int64).ravel().tolist(),
            "entropy_counts": self.entropy_counts.astype(np.int64).ravel().tolist(),
        }
        return zlib.compress(json.dumps(body, separators=(",", ":")).encode())


@dataclass(frozen=True)
class RebaselineRequest:
    """Ask the owning replica to drop a model's reference and take a new one from now on.

    `model_key` is one aggregation key (`name@config_hash/s<S>r<R>`, exporter.model_state.identity),
    `name@config_hash` (every keep-set of that identity) or `name@*` (every identity of a name).
    """

    model_key: str
    requested_seconds: float

    def matches(self, model_key: str) -> bool:
        """Return whether this request applies to the aggregation key `model_key`."""
        name, _, rest = model_key.rpartition("@")
        if self.model_key.endswith("@*"):
            return name == self.model_key[:-2]
        return self.model_key in (model_key, f"{name}@{rest.split('/', 1)[0]}")

    def to_bytes(self) -> bytes:
        """Return the record value: zlib-compressed JSON."""
        body = {"kind": "rebaseline", "format": _FORMAT, "model_key": self.model_key,
                "requested_seconds": self.requested_seconds}  # fmt: skip
        return zlib.compress(json.dumps(body).encode())


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ReferenceRecordError(f"expected field {name!r} of type {kind}, got {value!r:.80}")
    return value


def _counts(body: dict[str, Any], name: str, shape: tuple[int, int, int]) -> np.ndarray:
    values = _field(body, name, list)
    try:
        counts = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ReferenceRecordError(f"expected integer counts in {name!r}, got {exc}") from exc
    if counts.size != int(np.prod(shape)) or (counts < 0).any():
        raise ReferenceRecordError(
            f"expected {int(np.prod(shape))} non-negative counts in {name!r}, got {counts.size}"
        )
    return counts.reshape(shape)


def decode_record(value: bytes) -> Reference | RebaselineRequest:
    """Return the reference or request a record value encodes, or raise ReferenceRecordError."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(value, _MAX_RECORD_BYTES)
        body = json.loads(raw)
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReferenceRecordError(f"expected zlib-compressed JSON, got {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != _FORMAT:
        raise ReferenceRecordError(f"expected a format {_FORMAT} object, got {str(body)[:80]}")
    kind = body.get("kind")
    if kind == "rebaseline":
        return RebaselineRequest(
            model_key=_field(body, "model_key", str),
            requested_seconds=float(_field(body, "requested_seconds", (int, float))),
        )
    if kind != "reference":
        raise ReferenceRecordError(f"expected kind 'reference' or 'rebaseline', got {kind!r:.80}")
    layers = _field(body, "layers", int)
    heads = _field(body, "heads", int)
    if not (0 < layers <= 4096 and 0 < heads <= 4096):
        raise ReferenceRecordError(f"expected layers and heads in 1..4096, got {layers}x{heads}")
    return Reference(
        model_key=_field(body, "model_key", str),
        model_name=_field(body, "model_name", str),
        samples=_field(body, "samples", int),
        created_seconds=float(_field(body, "created_seconds", (int, float))),
        pattern_counts=_counts(body, "pattern_counts", (layers, heads, NUM_PATTERNS)),
        entropy_counts=_counts(body, "entropy_counts", (layers, heads, ENTROPY_BINS)),
    )
