"""The wire contract between the collector and the exporter: one message per sampled query row.

Usage:
    msg = HeadStatsMessage.build(header, {"entropy_nats": entropy, ...})
    same = HeadStatsMessage.from_bytes(msg.to_bytes())
    same.arrays().values  # every statistic as one read-only (stats, layers, heads) array, no copy

A message carries a JSON header (identity, context, sampling, layout) validated by pydantic and
the statistics as (num_layers, num_query_heads) arrays. The arrays travel as fixed-point
integers, byte-shuffled and zlib-compressed: each statistic has a quantum chosen so that the
rounding error stays below the accuracy the statistics are computed to (1e-5 absolute on masses
and entropy, 1e-4 on the eviction error), which keeps a 32 x 32-head message near 10 KB.
Messages never carry prompt text, token ids or anything that identifies a user.

This module imports pydantic and numpy only: the exporter imports it without torch.
"""

from __future__ import annotations

import functools
import importlib
import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

try:  # zlib-ng inflates the same streams, with the same errors, about twice as fast as zlib
    _inflating: ModuleType = importlib.import_module("zlib_ng.zlib_ng")
except ImportError:  # optional: the exporter extra installs it
    _inflating = zlib
_INFLATE_ERROR: type[Exception] = _inflating.error

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
# Token counts fit a signed 32-bit integer (2**31 - 1: far beyond any context); larger values are
# poison, not data, and would overflow the exporter's fixed-width arithmetic.
MAX_TOKENS = 2**31 - 1

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
# Weights of a statistic's four byte planes (big-endian u32, shuffled): their dot product with
# the planes is the integer code, exact in float64 because codes are below 2**32.
_PLANE_WEIGHTS = np.array([2.0**24, 2.0**16, 2.0**8, 1.0])

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
    context_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    query_position: Annotated[int, Field(ge=0, le=MAX_TOKENS)]
    sink_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)]
    recent_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)]
    num_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    num_query_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    num_kv_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    head_dim: Annotated[int, Field(ge=1, le=65536)]
    kv_dtype_bytes: Annotated[int, Field(ge=1, le=8)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    top_k: tuple[Annotated[int, Field(ge=1)], ...] = DEFAULT_TOP_K
    visible_keys: tuple[Annotated[int, Field(ge=0, le=MAX_TOKENS)], ...]
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


@dataclass(frozen=True)
class StatArrays:
    """The raw statistics of one message: one read-only stacked array and the validity mask.

    values: (stats, layers, heads) float64 in `names` (wire) order, NaN where not measured;
    valid: (layers, heads) bool. Both are read-only and shared with the message (no copies).

    Usage:
        arrays = msg.arrays()
        arrays["entropy_nats"]  # a view of arrays.values, the same array as msg.stat("entropy_nats")
    """

    names: tuple[str, ...]
    values: np.ndarray
    valid: np.ndarray

    def index(self, name: str) -> int:
        """Return the row of `values` that holds statistic `name`; KeyError if there is none."""
        row = _rows(self.names).get(name)
        if row is None:
            raise KeyError(f"unknown statistic {name!r}; this message has {list(self.names)}")
        return row

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[self.index(name)]


def _no_arrays() -> StatArrays:
    return StatArrays((), np.zeros((0, 0, 0)), np.zeros((0, 0), dtype=bool))


class HeadStatsMessage(BaseModel):
    """Per-(layer, query head) attention statistics of one sampled query row.

    Usage:
        msg.stat("entropy_nats")  # float64 array (num_layers, num_query_heads), NaN where not measured
        HeadStatsMessage.from_bytes(msg.to_bytes()) == msg
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    header: MessageHeader
    _arrays: StatArrays | None = PrivateAttr(default=None)  # set by build and from_bytes

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
        mine, theirs = self.arrays(), other.arrays()
        return (
            self.header == other.header
            and mine.names == theirs.names
            and np.array_equal(mine.valid, theirs.valid)
            and np.array_equal(mine.values, theirs.values, equal_nan=True)
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
        arrays = [np.asarray(stats[n], dtype=np.float64) for n in names]
        for n, a in zip(names, arrays, strict=True):
            if a.shape != shape:
                raise SchemaError("shape", f"{n} must have shape {shape}, got {a.shape}")
        values = np.stack(arrays) if arrays else np.zeros((0, *shape))
        valid = np.asarray(np.isfinite(values).all(axis=0))
        return cls._from_parts(header, _quantize(names, values, valid), valid)

    @classmethod
    def _from_parts(
        cls, header: MessageHeader, codes: np.ndarray, valid: np.ndarray
    ) -> HeadStatsMessage:
        """Return the message of integer `codes` (stats, layers, heads) and the validity mask."""
        _check_layout(header)
        values = codes * _quanta(header.stat_names)
        if not valid.all():
            values[:, ~valid] = np.nan
        values.flags.writeable = valid.flags.writeable = False
        _check_ranges(header, values, valid)
        msg = cls(header=header)
        msg._arrays = StatArrays(header.stat_names, values, valid)
        return msg

    def arrays(self) -> StatArrays:
        """Return the raw statistics and the validity mask as stored, without copying them.

        `msg.arrays()[name]` is `msg.stat(name)` for every statistic on the wire, and
        `msg.arrays().valid` is `msg.valid`; the derived `middle_mass` and `normalized_entropy`
        are only available from `stat`. The arrays are read-only.
        """
        # pydantic's own store of private attributes: `self._arrays` would go through
        # BaseModel.__getattr__, several microseconds per access on the exporter's hot path.
        arrays: StatArrays | None = (self.__pydantic_private__ or {}).get("_arrays")
        return arrays if arrays is not None else _no_arrays()

    def stat(self, name: str) -> np.ndarray:
        """Return one statistic as a float array (num_layers, num_query_heads); NaN = not measured."""
        arrays = self.arrays()
        if name == "normalized_entropy":
            log_keys = np.log(np.maximum(np.asarray(self.header.visible_keys, dtype=np.float64), 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = arrays["entropy_nats"] / log_keys[:, None]
            return np.where(log_keys[:, None] > 0, ratio, 0.0)
        if name == "middle_mass":
            middle = 1.0 - arrays["sink_mass"] - arrays["recent_mass"]
            return np.clip(middle, 0.0, 1.0)
        return arrays[name]

    @property
    def valid(self) -> np.ndarray:
        """Return the (num_layers, num_query_heads) mask of measured, finite entries."""
        return self.arrays().valid

    def to_bytes(self) -> bytes:
        """Return the wire encoding: frame, header JSON, zlib of the validity bits and arrays."""
        header = self.header.model_dump_json(exclude_none=True).encode()
        arrays = self.arrays()
        codes = _quantize(arrays.names, arrays.values, arrays.valid)
        # Byte-shuffle each statistic: the high bytes of small fixed-point numbers are mostly zero.
        planes = codes.astype(">u4").view(np.uint8).reshape(len(arrays.names), arrays.valid.size, 4)
        body = np.packbits(arrays.valid).tobytes() + planes.transpose(0, 2, 1).tobytes()
        return _FRAME.pack(_MAGIC, SCHEMA_MAJOR, len(header)) + header + zlib.compress(body, 6)

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
        payload = _inflate(memoryview(data)[_FRAME.size + header_len :])
        stats, cells = len(header.stat_names), header.num_layers * header.num_query_heads
        mask_bytes = (cells + 7) // 8
        expected = mask_bytes + 4 * cells * stats
        if len(payload) != expected:
            raise SchemaError("shape", f"payload of {len(payload)} bytes, expected {expected}")
        shape = (header.num_layers, header.num_query_heads)
        bits = np.unpackbits(np.frombuffer(payload, np.uint8, mask_bytes), count=cells)
        planes = np.frombuffer(payload, np.uint8, 4 * cells * stats, mask_bytes)
        codes = _PLANE_WEIGHTS @ planes.reshape(stats, 4, cells).astype(np.float64)
        return cls._from_parts(header, codes.reshape(stats, *shape), bits.view(bool).reshape(shape))


@functools.lru_cache(maxsize=64)
def _rows(names: tuple[str, ...]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


@functools.lru_cache(maxsize=64)
def _quanta(names: tuple[str, ...]) -> np.ndarray:
    """Return the quantum of each statistic as (stats, 1, 1); SchemaError for unknown names."""
    quanta = np.array([quantum_of(n) for n in names], dtype=np.float64).reshape(-1, 1, 1)
    quanta.flags.writeable = False
    return quanta


def _quantize(names: tuple[str, ...], values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Return the wire codes (stats, layers, heads) uint32 of values; 0 where not valid."""
    scaled = np.rint(np.where(valid, values, 0.0) / _quanta(names))
    outside = (scaled < 0) | (scaled > _MAX_ENCODED)
    if outside.any():
        name = names[int(np.argmax(outside.any(axis=(1, 2))))]
        limit = _MAX_ENCODED * quantum_of(name)
        raise SchemaError("out_of_range", f"{name} outside [0, {limit:g}]")
    return scaled.astype(np.uint32)


def _parse_header(raw: bytes) -> MessageHeader:
    # Fast path: pydantic parses and validates the JSON in one pass. Anything it refuses, and a
    # header without an explicit 1.x schema_version, goes through the slow path below, which
    # accepts exactly what it accepts and names the reason.
    try:
        header = MessageHeader.model_validate_json(raw)
    except ValidationError:
        pass
    else:
        if "schema_version" in header.model_fields_set and _is_major(header.schema_version):
            return header
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError("decode", f"header is not JSON ({exc})") from exc
    if not isinstance(fields, dict):
        raise SchemaError("decode", "header is not a JSON object")
    version = str(fields.get("schema_version", ""))
    if not _is_major(version):
        raise SchemaError("schema_version", f"expected {SCHEMA_MAJOR}.x, got {version!r}")
    try:
        return MessageHeader.model_validate(fields)
    except ValidationError as exc:
        non_finite = any("finite" in str(e.get("msg", "")) for e in exc.errors())
        reason = "non_finite" if non_finite else "validation"
        raise SchemaError(reason, f"invalid header ({exc.error_count()} errors)") from exc


def _is_major(version: str) -> bool:
    return version.split(".")[0] == str(SCHEMA_MAJOR)


def _inflate(raw: bytes | memoryview) -> bytes:
    inflater = _inflating.decompressobj()
    try:
        payload = inflater.decompress(raw, _MAX_PAYLOAD_BYTES)
    except _INFLATE_ERROR as exc:
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
    _check_stat_names(header.stat_names, header.top_k)


@functools.lru_cache(maxsize=64)  # only names that pass are cached: a raise is not
def _check_stat_names(names: tuple[str, ...], top_k: tuple[int, ...]) -> None:
    expected = core_stat_names(top_k)
    for n in names:
        quantum_of(n)
    if names != expected:
        raise SchemaError("unknown_stat", f"expected statistics {expected}, got {names}")


@functools.lru_cache(maxsize=64)
def _mass_rows(names: tuple[str, ...]) -> slice | np.ndarray:
    """Return the rows of the masses: a slice (a view, no copy) when they are contiguous."""
    rows = [i for i, n in enumerate(names) if n.endswith("_mass")]
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return np.array(rows, dtype=np.intp)


def _check_ranges(header: MessageHeader, values: np.ndarray, valid: np.ndarray) -> None:
    """Raise SchemaError('out_of_range') unless every measured value is possible.

    `values` holds NaN where not measured, and a comparison with NaN is false: each `any` below
    equals the `nanmax` bound it stands for, in one pass and without warnings.
    """
    if not valid.any():
        return
    rows = _rows(header.stat_names)
    masses = values[_mass_rows(header.stat_names)]
    if (masses > 1 + MASS_TOLERANCE).any():
        raise SchemaError("out_of_range", f"a mass of {np.nanmax(masses):g} is above 1")
    if (values[rows["sink_mass"]] + values[rows["recent_mass"]] > 1 + MASS_TOLERANCE).any():
        raise SchemaError("out_of_range", "sink + recent mass is above 1")
    visible = np.asarray(header.visible_keys, dtype=np.float64)[:, None]
    if (values[rows["keys_for_90pct"]] > visible).any():  # keys - visible > 0, exactly
        raise SchemaError("out_of_range", "keys_for_90pct exceeds the visible keys")
    log_keys = np.log(np.maximum(visible, 1))
    if (values[rows["entropy_nats"]] - log_keys > 1e-3).any():
        raise SchemaError("out_of_range", "entropy_nats exceeds ln(visible keys)")


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of the message header (the arrays travel as the binary payload)."""
    schema = MessageHeader.model_json_schema()
    schema["$comment"] = (
        "headwatch head-stats header, schema "
        f"{SCHEMA_VERSION}; frame: b'HWS', u8 major, u32 header length, header, zlib payload"
    )
    return schema
