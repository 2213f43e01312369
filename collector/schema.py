"""The wire contract between the collector and the exporter: one message per sampled query row.

Usage:
    msg = HeadStatsMessage.build(header, {"entropy_nats": entropy, ...})
    same = HeadStatsMessage.from_bytes(msg.to_bytes())

A message carries a JSON header (identity, context, sampling, layout) validated by pydantic and
the statistics as (num_layers, num_query_heads) arrays. The arrays travel as fixed-point
integers, byte-shuffled and zlib-compressed: each statistic has a quantum chosen so that the
rounding error stays below the accuracy the statistics are computed to (1e-5 absolute on masses
and entropy, 1e-4 on the eviction error), which keeps a 32 x 32-head message near 10 KB.
Messages never carry prompt text, token ids or anything that identifies a user.

This module imports pydantic and numpy only: the exporter imports it without torch.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

TOPIC = "headwatch.head-stats.v1"
DEAD_LETTER_TOPIC = f"{TOPIC}.dlq"
SCHEMA_MAJOR = 1
SCHEMA_MINOR = 0
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

# Frame: magic, major version, header length, header JSON, zlib(payload).
_MAGIC = b"HWS"
_FRAME = struct.Struct(">3sBI")
MAX_MESSAGE_BYTES = 1 << 20
_MAX_PAYLOAD_BYTES = 8 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024

DEFAULT_TOP_K = (1, 16, 256)

# Quantum of each statistic's fixed-point encoding: half of it is the largest rounding error.
# Sink and recent mass: 2**-17 (error <= 3.8e-6), so that middle mass, which does not travel and
# is 1 - sink - recent, stays within 7.6e-6. Top-k masses and entropy: 2**-16 (<= 7.6e-6);
# eviction error: 2**-13 (<= 6.1e-5, its accuracy is 1e-4); key counts are integers.
_QUANTUM: dict[str, float] = {
    "entropy_nats": 2.0**-16,
    "sink_mass": 2.0**-17,
    "recent_mass": 2.0**-17,
    "eviction_error": 2.0**-13,
    "keys_for_90pct": 1.0,
}
_TOP_K_QUANTUM = 2.0**-16
_MAX_ENCODED = float(np.iinfo(np.uint32).max)
MASS_TOLERANCE = 1e-3  # masses (and sink + recent) may exceed 1 by float error only

Flag = Literal["non_finite", "fully_masked", "layers_skipped"]
Phase = Literal["prefill", "decode"]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class SchemaError(ValueError):
    """A message that cannot be encoded or decoded; `reason` is a small closed set for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def top_k_stat(k: int) -> str:
    """Return the statistic name of the top-k mass, e.g. `top16_mass`."""
    return f"top{k}_mass"


def quantum_of(stat: str) -> float:
    """Return the fixed-point quantum of a statistic name, or raise SchemaError for unknown names."""
    if stat in _QUANTUM:
        return _QUANTUM[stat]
    if stat.startswith("top") and stat.endswith("_mass") and stat[3:-5].isdigit():
        return _TOP_K_QUANTUM
    raise SchemaError("unknown_stat", f"unknown statistic {stat!r}")


def core_stat_names(top_k: tuple[int, ...] = DEFAULT_TOP_K) -> tuple[str, ...]:
    """Return the statistics every message carries, in wire order (middle mass is derived)."""
    return (
        "entropy_nats",
        "sink_mass",
        "recent_mass",
        *(top_k_stat(k) for k in top_k),
        "keys_for_90pct",
        "eviction_error",
    )


class MessageHeader(BaseModel):
    """Everything of a message except the statistic arrays."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    schema_version: str = SCHEMA_VERSION
    message_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    model_name: Name
    model_revision: Annotated[str, Field(max_length=256)] = ""
    config_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    server_id: Annotated[str, Field(max_length=256)] = ""
    timestamp_seconds: Annotated[float, Field(ge=0)]
    phase: Phase
    context_tokens: Annotated[int, Field(ge=1)]
    query_position: Annotated[int, Field(ge=0)]
    sink_tokens: Annotated[int, Field(ge=0)]
    recent_tokens: Annotated[int, Field(ge=0)]
    num_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    num_query_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    num_kv_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    head_dim: Annotated[int, Field(ge=1, le=65536)]
    kv_dtype_bytes: Annotated[int, Field(ge=1, le=8)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    top_k: tuple[Annotated[int, Field(ge=1)], ...] = DEFAULT_TOP_K
    visible_keys: tuple[Annotated[int, Field(ge=0)], ...]
    flags: tuple[Flag, ...] = ()
    stat_names: tuple[str, ...]
    top_middle_positions: tuple[tuple[tuple[int, ...], ...], ...] | None = None

    @property
    def query_heads_per_kv_head(self) -> int:
        """Return the GQA group size: query head h reads KV head h // group."""
        return self.num_query_heads // self.num_kv_heads

    @property
    def model_key(self) -> str:
        """Return the Kafka key: one model identity aggregates in one partition."""
        return f"{self.model_name}@{self.config_hash}"


class HeadStatsMessage(BaseModel):
    """Per-(layer, query head) attention statistics of one sampled query row.

    Usage:
        msg.stat("entropy_nats")  # float64 array (num_layers, num_query_heads), NaN where not measured
        HeadStatsMessage.from_bytes(msg.to_bytes()) == msg
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    header: MessageHeader
    _stats: dict[str, np.ndarray] = PrivateAttr(default_factory=dict)
    _valid: np.ndarray = PrivateAttr(default_factory=lambda: np.zeros((0, 0), dtype=bool))

    # Convenience accessors named in the public contract.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private attributes: the hot path of decoding
            return super().__getattr__(name)  # type: ignore[misc]
        if name in MessageHeader.model_fields or name in {"query_heads_per_kv_head", "model_key"}:
            return getattr(self.header, name)
        return super().__getattr__(name)  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadStatsMessage):
            return NotImplemented
        return (
            self.header == other.header
            and np.array_equal(self._valid, other._valid)
            and all(
                np.array_equal(self._stats[n], other._stats[n], equal_nan=True)
                for n in self.header.stat_names
            )
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def build(cls, header: MessageHeader, stats: Mapping[str, np.ndarray]) -> HeadStatsMessage:
        """Return a message from a header and float arrays; non-finite entries become 'not measured'.

        Values are rounded to the wire quantum here, so a message compares equal to its decoded copy.
        """
        names = tuple(header.stat_names)
        # middle_mass may be passed along; it is derived from sink and recent on the wire.
        if set(stats) - {"middle_mass"} != set(names):
            raise SchemaError(
                "unknown_stat", f"expected statistics {sorted(names)}, got {sorted(stats)}"
            )
        shape = (header.num_layers, header.num_query_heads)
        arrays = {n: np.asarray(stats[n], dtype=np.float64) for n in names}
        for n, a in arrays.items():
            if a.shape != shape:
                raise SchemaError("shape", f"{n} must have shape {shape}, got {a.shape}")
        valid = np.ones(shape, dtype=bool)
        for a in arrays.values():
            valid &= np.isfinite(a)
        encoded = {n: _quantize(n, a, valid) for n, a in arrays.items()}
        return cls._from_parts(header, encoded, valid)

    @classmethod
    def _from_parts(
        cls, header: MessageHeader, encoded: Mapping[str, np.ndarray], valid: np.ndarray
    ) -> HeadStatsMessage:
        _check_layout(header)
        msg = cls(header=header)
        msg._valid = valid
        msg._stats = {
            n: np.where(valid, encoded[n] * quantum_of(n), np.nan) for n in header.stat_names
        }
        for a in msg._stats.values():
            a.flags.writeable = False
        _check_ranges(msg)
        return msg

    def stat(self, name: str) -> np.ndarray:
        """Return one statistic as a float array (num_layers, num_query_heads); NaN = not measured."""
        if name == "normalized_entropy":
            log_keys = np.log(np.maximum(np.asarray(self.header.visible_keys, dtype=np.float64), 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = self._stats["entropy_nats"] / log_keys[:, None]
            return np.where(log_keys[:, None] > 0, ratio, 0.0)
        if name == "middle_mass":
            middle = 1.0 - self._stats["sink_mass"] - self._stats["recent_mass"]
            return np.clip(middle, 0.0, 1.0)
        if name not in self._stats:
            raise KeyError(f"unknown statistic {name!r}; this message has {list(self._stats)}")
        return self._stats[name]

    @property
    def valid(self) -> np.ndarray:
        """Return the (num_layers, num_query_heads) mask of measured, finite entries."""
        return self._valid

    def to_bytes(self) -> bytes:
        """Return the wire encoding: frame, header JSON, zlib of the validity bits and arrays."""
        header = self.header.model_dump_json(exclude_none=True).encode()
        parts = [np.packbits(self._valid).tobytes()]
        for n in self.header.stat_names:
            ints = _quantize(n, self._stats[n], self._valid)
            # Byte-shuffle: the high bytes of small fixed-point numbers are mostly zero.
            parts.append(ints.astype(">u4").view(np.uint8).reshape(-1, 4).T.tobytes())
        payload = zlib.compress(b"".join(parts), 6)
        return _FRAME.pack(_MAGIC, SCHEMA_MAJOR, len(header)) + header + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> HeadStatsMessage:
        """Decode and validate a message, or raise SchemaError with a reason for metrics."""
        if len(data) > MAX_MESSAGE_BYTES:
            raise SchemaError("oversized", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
        if len(data) < _FRAME.size:
            raise SchemaError("decode", f"{len(data)} bytes is shorter than the frame")
        magic, major, header_len = _FRAME.unpack_from(data)
        if magic != _MAGIC:
            raise SchemaError("decode", "not a headwatch head-stats message (bad magic)")
        if major != SCHEMA_MAJOR:
            raise SchemaError("schema_version", f"expected major {SCHEMA_MAJOR}, got {major}")
        header = _parse_header(data[_FRAME.size : _FRAME.size + header_len])
        payload = _inflate(data[_FRAME.size + header_len :])
        cells = header.num_layers * header.num_query_heads
        mask_bytes = (cells + 7) // 8
        expected = mask_bytes + 4 * cells * len(header.stat_names)
        if len(payload) != expected:
            raise SchemaError("shape", f"payload of {len(payload)} bytes, expected {expected}")
        shape = (header.num_layers, header.num_query_heads)
        valid = np.unpackbits(np.frombuffer(payload, np.uint8, mask_bytes))[:cells]
        encoded: dict[str, np.ndarray] = {}
        offset = mask_bytes
        for n in header.stat_names:
            raw = np.frombuffer(payload, np.uint8, 4 * cells, offset).reshape(4, cells).T
            encoded[n] = raw.copy().view(">u4").reshape(shape).astype(np.float64)
            offset += 4 * cells
        return cls._from_parts(header, encoded, valid.reshape(shape).astype(bool))


def _quantize(name: str, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    q = quantum_of(name)
    scaled = np.rint(np.where(valid, values, 0.0) / q)
    if np.any(scaled < 0) or np.any(scaled > _MAX_ENCODED):
        raise SchemaError("out_of_range", f"{name} outside [0, {_MAX_ENCODED * q:g}]")
    return scaled.astype(np.uint32)


def _parse_header(raw: bytes) -> MessageHeader:
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError("decode", f"header is not JSON ({exc})") from exc
    if not isinstance(fields, dict):
        raise SchemaError("decode", "header is not a JSON object")
    version = str(fields.get("schema_version", ""))
    if version.split(".")[0] != str(SCHEMA_MAJOR):
        raise SchemaError("schema_version", f"expected {SCHEMA_MAJOR}.x, got {version!r}")
    try:
        return MessageHeader.model_validate(fields)
    except ValidationError as exc:
        non_finite = any("finite" in str(e.get("msg", "")) for e in exc.errors())
        reason = "non_finite" if non_finite else "validation"
        raise SchemaError(reason, f"invalid header ({exc.error_count()} errors)") from exc


def _inflate(raw: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(raw, _MAX_PAYLOAD_BYTES)
    except zlib.error as exc:
        raise SchemaError("decode", f"payload is not zlib ({exc})") from exc
    if inflater.unconsumed_tail:
        raise SchemaError("oversized", f"payload inflates past {_MAX_PAYLOAD_BYTES} bytes")
    return payload


def _check_layout(header: MessageHeader) -> None:
    if header.num_query_heads % header.num_kv_heads:
        raise SchemaError(
            "shape",
            f"num_query_heads ({header.num_query_heads}) must be a multiple of "
            f"num_kv_heads ({header.num_kv_heads})",
        )
    if len(header.visible_keys) != header.num_layers:
        raise SchemaError(
            "shape",
            f"visible_keys has {len(header.visible_keys)} entries, expected {header.num_layers}",
        )
    expected = core_stat_names(header.top_k)
    for n in header.stat_names:
        quantum_of(n)
    if tuple(header.stat_names) != expected:
        raise SchemaError(
            "unknown_stat", f"expected statistics {expected}, got {header.stat_names}"
        )


def _check_ranges(msg: HeadStatsMessage) -> None:
    if not msg.valid.any():
        return
    stats = msg._stats
    worst_mass = max(float(np.nanmax(stats[n])) for n in stats if n.endswith("_mass"))
    if worst_mass > 1 + MASS_TOLERANCE:
        raise SchemaError("out_of_range", f"a mass of {worst_mass:g} is above 1")
    if float(np.nanmax(stats["sink_mass"] + stats["recent_mass"])) > 1 + MASS_TOLERANCE:
        raise SchemaError("out_of_range", "sink + recent mass is above 1")
    visible = np.asarray(msg.header.visible_keys, dtype=np.float64)[:, None]
    if float(np.nanmax(stats["keys_for_90pct"] - visible)) > 0:
        raise SchemaError("out_of_range", "keys_for_90pct exceeds the visible keys")
    log_keys = np.log(np.maximum(visible, 1))
    if float(np.nanmax(stats["entropy_nats"] - log_keys)) > 1e-3:
        raise SchemaError("out_of_range", "entropy_nats exceeds ln(visible keys)")


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of the message header (the arrays travel as the binary payload)."""
    schema = MessageHeader.model_json_schema()
    schema["$comment"] = (
        "headwatch head-stats header, schema "
        f"{SCHEMA_VERSION}; frame: b'HWS', u8 major, u32 header length, header, zlib payload"
    )
    return schema
