"""The binary encoding of a head-stats message: frame, header JSON, shuffled fixed-point arrays.

Usage:
    data = encode(msg.header, msg.arrays())
    header, codes, valid = decode(data)  # then decode_values(header, codes, valid)

Frame: b"HWS", u8 schema major, u32 header length, the header JSON, then zlib of the validity
bits and of each statistic's u32 fixed-point codes, byte-shuffled (the high bytes of small
fixed-point numbers are mostly zero). Decoding checks everything a poisoned message could break:
sizes, framing, the header, the payload length, layout, statistic names and value ranges, and
raises `collector.schema.SchemaError` with a reason from a small closed set.

`collector.schema` holds the models and the public API and imports this module; this module
imports it back as a module (names are looked up at call time, so either may be imported first).
Like the schema, it imports pydantic and numpy only: never torch.
"""

from __future__ import annotations

import functools
import importlib
import json
import struct
import zlib
from types import ModuleType

import numpy as np
from pydantic import ValidationError

from collector import schema

try:  # zlib-ng inflates the same streams, with the same errors, about twice as fast as zlib
    _inflating: ModuleType = importlib.import_module("zlib_ng.zlib_ng")
except ImportError:  # optional: the exporter extra installs it
    _inflating = zlib
_INFLATE_ERROR: type[Exception] = _inflating.error

# Frame: magic, major version, header length, header JSON, zlib(payload).
_MAGIC = b"HWS"
_FRAME = struct.Struct(">3sBI")
_MAX_PAYLOAD_BYTES = 8 << 20
_MAX_ENCODED = float(np.iinfo(np.uint32).max)
# Weights of a statistic's four byte planes (big-endian u32, shuffled): their dot product with
# the planes is the integer code, exact in float64 because codes are below 2**32.
_PLANE_WEIGHTS = np.array([2.0**24, 2.0**16, 2.0**8, 1.0])


def encode(header: schema.MessageHeader, arrays: schema.StatArrays) -> bytes:
    """Return the wire encoding: frame, header JSON, zlib of the validity bits and arrays."""
    raw = header.model_dump_json(exclude_none=True).encode()
    codes = quantize(arrays.names, arrays.values, arrays.valid)
    # Byte-shuffle each statistic: the high bytes of small fixed-point numbers are mostly zero.
    planes = codes.astype(">u4").view(np.uint8).reshape(len(arrays.names), arrays.valid.size, 4)
    body = np.packbits(arrays.valid).tobytes() + planes.transpose(0, 2, 1).tobytes()
    return _FRAME.pack(_MAGIC, schema.SCHEMA_MAJOR, len(raw)) + raw + zlib.compress(body, 6)


def decode(data: bytes) -> tuple[schema.MessageHeader, np.ndarray, np.ndarray]:
    """Return the header, the integer codes (stats, layers, heads) and the validity mask of `data`.

    Raises SchemaError for anything but a well-framed message with a valid header and a payload
    of the size the header announces; `decode_values` checks the rest.
    """
    if len(data) > schema.MAX_MESSAGE_BYTES:
        raise schema.SchemaError("oversized", f"{len(data)} bytes > {schema.MAX_MESSAGE_BYTES}")
    if len(data) < _FRAME.size:
        raise schema.SchemaError("decode", f"{len(data)} bytes is shorter than the frame")
    magic, major, header_len = _FRAME.unpack_from(data)
    if magic != _MAGIC:
        raise schema.SchemaError("decode", "not a headwatch head-stats message (bad magic)")
    if major != schema.SCHEMA_MAJOR:
        raise schema.SchemaError(
            "schema_version", f"expected major {schema.SCHEMA_MAJOR}, got {major}"
        )
    header = _parse_header(data[_FRAME.size : _FRAME.size + header_len])
    payload = _inflate(memoryview(data)[_FRAME.size + header_len :])
    stats, cells = len(header.stat_names), header.num_layers * header.num_query_heads
    mask_bytes = (cells + 7) // 8
    expected = mask_bytes + 4 * cells * stats
    if len(payload) != expected:
        raise schema.SchemaError("shape", f"payload of {len(payload)} bytes, expected {expected}")
    shape = (header.num_layers, header.num_query_heads)
    bits = np.unpackbits(np.frombuffer(payload, np.uint8, mask_bytes), count=cells)
    planes = np.frombuffer(payload, np.uint8, 4 * cells * stats, mask_bytes)
    codes = _PLANE_WEIGHTS @ planes.reshape(stats, 4, cells).astype(np.float64)
    return header, codes.reshape(stats, *shape), bits.view(bool).reshape(shape)


def decode_values(header: schema.MessageHeader, codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Return the float64 values (stats, layers, heads) of integer `codes`, NaN where not `valid`.

    Checks the layout, the statistic names and the value ranges first (SchemaError). The values
    and `valid` are made read-only: messages share them without copies.
    """
    _check_layout(header)
    values = codes * quanta(header.stat_names)
    if not valid.all():
        values[:, ~valid] = np.nan
    values.flags.writeable = valid.flags.writeable = False
    _check_ranges(header, values, valid)
    return values


@functools.lru_cache(maxsize=64)
def stat_rows(names: tuple[str, ...]) -> dict[str, int]:
    """Return the row of each statistic in the stacked arrays (wire order)."""
    return {n: i for i, n in enumerate(names)}


@functools.lru_cache(maxsize=64)
def quanta(names: tuple[str, ...]) -> np.ndarray:
    """Return the quantum of each statistic as (stats, 1, 1); SchemaError for unknown names."""
    table = np.array([schema.quantum_of(n) for n in names], dtype=np.float64).reshape(-1, 1, 1)
    table.flags.writeable = False
    return table


def quantize(names: tuple[str, ...], values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Return the wire codes (stats, layers, heads) uint32 of values; 0 where not valid."""
    scaled = np.rint(np.where(valid, values, 0.0) / quanta(names))
    outside = (scaled < 0) | (scaled > _MAX_ENCODED)
    if outside.any():
        name = names[int(np.argmax(outside.any(axis=(1, 2))))]
        limit = _MAX_ENCODED * schema.quantum_of(name)
        raise schema.SchemaError("out_of_range", f"{name} outside [0, {limit:g}]")
    return scaled.astype(np.uint32)


def _parse_header(raw: bytes) -> schema.MessageHeader:
    # Fast path: pydantic parses and validates the JSON in one pass. Anything it refuses, and a
    # header without an explicit 1.x schema_version, goes through the slow path below, which
    # accepts exactly what it accepts and names the reason.
    try:
        header = schema.MessageHeader.model_validate_json(raw)
    except ValidationError:
        pass
    else:
        if "schema_version" in header.model_fields_set and _is_major(header.schema_version):
            return header
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise schema.SchemaError("decode", f"header is not JSON ({exc})") from exc
    if not isinstance(fields, dict):
        raise schema.SchemaError("decode", "header is not a JSON object")
    version = str(fields.get("schema_version", ""))
    if not _is_major(version):
        raise schema.SchemaError(
            "schema_version", f"expected {schema.SCHEMA_MAJOR}.x, got {version!r}"
        )
    try:
        return schema.MessageHeader.model_validate(fields)
    except ValidationError as exc:
        non_finite = any("finite" in str(e.get("msg", "")) for e in exc.errors())
        reason = "non_finite" if non_finite else "validation"
        raise schema.SchemaError(reason, f"invalid header ({exc.error_count()} errors)") from exc


def _is_major(version: str) -> bool:
    return version.split(".")[0] == str(schema.SCHEMA_MAJOR)


def _inflate(raw: bytes | memoryview) -> bytes:
    inflater = _inflating.decompressobj()
    try:
        payload = inflater.decompress(raw, _MAX_PAYLOAD_BYTES)
    except _INFLATE_ERROR as exc:
        raise schema.SchemaError("decode", f"payload is not zlib ({exc})") from exc
    if inflater.unconsumed_tail:
        raise schema.SchemaError("oversized", f"payload inflates past {_MAX_PAYLOAD_BYTES} bytes")
    return payload


def _check_layout(header: schema.MessageHeader) -> None:
    if header.num_query_heads % header.num_kv_heads:
        raise schema.SchemaError(
            "shape",
            f"num_query_heads ({header.num_query_heads}) must be a multiple of "
            f"num_kv_heads ({header.num_kv_heads})",
        )
    if len(header.visible_keys) != header.num_layers:
        raise schema.SchemaError(
            "shape",
            f"visible_keys has {len(header.visible_keys)} entries, expected {header.num_layers}",
        )
    _check_stat_names(header.stat_names, header.top_k)
    if header.top_middle_positions is not None:
        _check_middle_positions(header)


def _check_middle_positions(header: schema.MessageHeader) -> None:
    layers = header.top_middle_positions or ()
    if len(layers) != header.num_layers or any(len(h) != header.num_query_heads for h in layers):
        raise schema.SchemaError(
            "shape",
            f"top_middle_positions must be {header.num_layers} layers x "
            f"{header.num_query_heads} heads, got {len(layers)} layers of "
            f"{sorted({len(h) for h in layers})} heads",
        )
    if any(p > header.query_position for heads in layers for ps in heads for p in ps):
        raise schema.SchemaError(
            "out_of_range",
            f"top_middle_positions must lie at or before query_position {header.query_position}",
        )


@functools.lru_cache(maxsize=64)  # only names that pass are cached: a raise is not
def _check_stat_names(names: tuple[str, ...], top_k: tuple[int, ...]) -> None:
    expected = schema.core_stat_names(top_k, learned_sinks=schema.LEARNED_SINK_STAT in names)
    for n in names:
        schema.quantum_of(n)
    if names != expected:
        raise schema.SchemaError("unknown_stat", f"expected statistics {expected}, got {names}")


@functools.lru_cache(maxsize=64)
def mass_rows(names: tuple[str, ...]) -> slice | np.ndarray:
    """Return the rows of the masses: a slice (a view, no copy) when they are contiguous."""
    rows = [i for i, n in enumerate(names) if n.endswith("_mass")]
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return np.array(rows, dtype=np.intp)


def _check_ranges(header: schema.MessageHeader, values: np.ndarray, valid: np.ndarray) -> None:
    """Raise SchemaError('out_of_range') unless every measured value is possible.

    `values` holds NaN where not measured, and a comparison with NaN is false: each `any` below
    equals the `nanmax` bound it stands for, in one pass and without warnings.
    """
    if not valid.any():
        return
    rows = stat_rows(header.stat_names)
    masses = values[mass_rows(header.stat_names)]
    if (masses > 1 + schema.MASS_TOLERANCE).any():
        raise schema.SchemaError("out_of_range", f"a mass of {np.nanmax(masses):g} is above 1")
    regions = values[rows["sink_mass"]] + values[rows["recent_mass"]]
    if header.learned_sinks:
        regions = regions + values[rows[schema.LEARNED_SINK_STAT]]
    if (regions > 1 + schema.MASS_TOLERANCE).any():
        raise schema.SchemaError("out_of_range", "sink + recent (+ learned sink) mass is above 1")
    visible = np.asarray(header.visible_keys, dtype=np.float64)[:, None]
    if (values[rows["keys_for_90pct"]] > visible).any():  # keys - visible > 0, exactly
        raise schema.SchemaError("out_of_range", "keys_for_90pct exceeds the visible keys")
    # A learned sink is one more outcome than the visible keys (`schema.outcomes`).
    log_outcomes = np.log(np.maximum(schema.outcomes(header), 1))[:, None]
    if (values[rows["entropy_nats"]] - log_outcomes > 1e-3).any():
        raise schema.SchemaError(
            "out_of_range", "entropy_nats exceeds ln(visible keys, plus 1 with a learned sink)"
        )
