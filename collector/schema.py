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

Models with learned sink logits (gpt-oss): the learned sink is one more outcome of each query
head's attention distribution besides the visible keys, attached to no key and no value. Every
statistic is of that whole distribution: the masses of keys are their probabilities next to
the learned sink, the entropy counts it (so it can reach ln(visible keys + 1), and
`normalized_entropy` divides by that), `keys_for_90pct` counts keys holding 90% of the keys'
mass, and the eviction error keeps the learned sink (it is never evicted). Such messages carry
its mass as `learned_sink_mass` (schema 1.1; `MessageHeader.learned_sinks`), and `middle_mass`
is 1 - sink - recent - learned sink mass.

The binary encoding and the checks of decoded messages live in `collector.codec`.
This module and the codec import pydantic and numpy only: the exporter imports them without torch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from collector import codec

TOPIC = "headwatch.head-stats.v1"
DEAD_LETTER_TOPIC = f"{TOPIC}.dlq"
SCHEMA_MAJOR = 1
# 1.1: messages of models with learned sink logits carry `learned_sink_mass` (see
# `core_stat_names`); a 1.0 decoder rejects only those, as an unknown statistic.
SCHEMA_MINOR = 1
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

MAX_MESSAGE_BYTES = 1 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024
# Token counts fit a signed 32-bit integer (2**31 - 1: far beyond any context); larger values are
# poison, not data, and would overflow the exporter's fixed-width arithmetic.
MAX_TOKENS = 2**31 - 1
# Opt-in positions of the largest middle keys: at most this many per head.
MAX_MIDDLE_KEYS = 64

DEFAULT_TOP_K = (1, 16, 256)

# The probability a model's learned sink logit takes (gpt-oss `sinks`: one more logit per query
# head, softmaxed with the keys', attached to no key and no value). Only messages of models
# that have them carry it.
LEARNED_SINK_STAT = "learned_sink_mass"

# Quantum of each statistic's fixed-point encoding: half of it is the largest rounding error.
# Sink and recent mass: 2**-17 (error <= 3.8e-6), so that middle mass, which does not travel and
# is 1 - sink - recent, stays within 7.6e-6; the learned sink mass, which it also subtracts where
# there is one, 2**-18 (<= 1.9e-6, so 9.5e-6 in all). Top-k masses and entropy: 2**-16
# (<= 7.6e-6); eviction error: 2**-13 (<= 6.1e-5, its accuracy is 1e-4); key counts are integers.
_QUANTUM: dict[str, float] = {
    "entropy_nats": 2.0**-16,
    "sink_mass": 2.0**-17,
    "recent_mass": 2.0**-17,
    LEARNED_SINK_STAT: 2.0**-18,
    "eviction_error": 2.0**-13,
    "keys_for_90pct": 1.0,
}
_TOP_K_QUANTUM = 2.0**-16
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


def core_stat_names(
    top_k: tuple[int, ...] = DEFAULT_TOP_K, learned_sinks: bool = False
) -> tuple[str, ...]:
    """Return the statistics a message carries, in wire order (middle mass is derived).

    With `learned_sinks` (a model whose attention has learned sink logits) the mass of the
    learned sink follows the recent mass: every mass of a message sits in consecutive rows.
    """
    return _core_stat_names(tuple(top_k), learned_sinks)


@functools.lru_cache(maxsize=64)  # once per top-k set: the collector asks on every sampled pass
def _core_stat_names(top_k: tuple[int, ...], learned_sinks: bool) -> tuple[str, ...]:
    return (
        "entropy_nats",
        "sink_mass",
        "recent_mass",
        *((LEARNED_SINK_STAT,) if learned_sinks else ()),
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
    # At least one k: the exporter's pattern classifier reads the top-k masses.
    top_k: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1)] = DEFAULT_TOP_K
    visible_keys: tuple[Annotated[int, Field(ge=0, le=MAX_TOKENS)], ...]
    flags: tuple[Flag, ...] = ()
    stat_names: tuple[str, ...]
    # Opt-in (`top_middle_positions` setting): per layer, per query head, the absolute token
    # positions (never the content) of the largest middle keys, largest first; () where a layer
    # or head was not measured. None when not collected.
    top_middle_positions: (
        tuple[
            tuple[
                Annotated[
                    tuple[Annotated[int, Field(ge=0, le=MAX_TOKENS)], ...],
                    Field(max_length=MAX_MIDDLE_KEYS),
                ],
                ...,
            ],
            ...,
        ]
        | None
    ) = None

    @property
    def query_heads_per_kv_head(self) -> int:
        """Return the GQA group size: query head h reads KV head h // group."""
        return self.num_query_heads // self.num_kv_heads

    @property
    def model_key(self) -> str:
        """Return the Kafka key: one model identity aggregates in one partition."""
        return f"{self.model_name}@{self.config_hash}"

    @property
    def learned_sinks(self) -> bool:
        """Return whether the model has learned sink logits (the message carries their mass).

        The learned sink is one more outcome of the attention distribution, besides the
        visible keys: the entropy can reach ln(visible keys + 1), and the sink, recent, middle
        and learned sink masses sum to 1.
        """
        return LEARNED_SINK_STAT in self.stat_names


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
        row = codec.stat_rows(self.names).get(name)
        if row is None:
            raise KeyError(f"unknown statistic {name!r}; this message has {list(self.names)}")
        return row

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[self.index(name)]


_HEADER_PROPERTIES = frozenset({"query_heads_per_kv_head", "model_key", "learned_sinks"})


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
        if name in MessageHeader.model_fields or name in _HEADER_PROPERTIES:
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
        return cls.from_table(header, np.stack(arrays) if arrays else np.zeros((0, *shape)))

    @classmethod
    def from_table(cls, header: MessageHeader, values: np.ndarray) -> HeadStatsMessage:
        """`build` from one float64 array (stats, layers, heads) in `header.stat_names` order.

        What the collector assembles (no dict to split and stack again).
        """
        expected = (len(header.stat_names), header.num_layers, header.num_query_heads)
        if values.shape != expected:
            raise SchemaError("shape", f"statistics must have shape {expected}, got {values.shape}")
        valid = np.asarray(np.isfinite(values).all(axis=0))
        return cls._from_parts(header, codec.quantize(header.stat_names, values, valid), valid)

    @classmethod
    def _from_parts(
        cls, header: MessageHeader, codes: np.ndarray, valid: np.ndarray
    ) -> HeadStatsMessage:
        """Return the message of integer `codes` (stats, layers, heads) and the validity mask."""
        values = codec.decode_values(header, codes, valid)
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
            log_keys = np.log(np.maximum(outcomes(self.header), 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = arrays["entropy_nats"] / log_keys[:, None]
            return np.where(log_keys[:, None] > 0, ratio, 0.0)
        if name == "middle_mass":
            # The learned sink belongs to no key: it is neither sink, recent nor middle.
            middle = 1.0 - arrays["sink_mass"] - arrays["recent_mass"]
            if self.header.learned_sinks:
                middle -= arrays[LEARNED_SINK_STAT]
            return np.clip(middle, 0.0, 1.0)
        return arrays[name]

    @property
    def valid(self) -> np.ndarray:
        """Return the (num_layers, num_query_heads) mask of measured, finite entries."""
        return self.arrays().valid

    def to_bytes(self) -> bytes:
        """Return the wire encoding: frame, header JSON, zlib of the validity bits and arrays."""
        return codec.encode(self.header, self.arrays())

    @classmethod
    def from_bytes(cls, data: bytes) -> HeadStatsMessage:
        """Decode and validate a message, or raise SchemaError with a reason for metrics."""
        return cls._from_parts(*codec.decode(data))


def outcomes(header: MessageHeader) -> np.ndarray:
    """Return (num_layers,) float64: the outcomes of each layer's attention distribution.

    The visible keys, plus one for the learned sink where the model has one: the entropy is at
    most the logarithm of this, and `normalized_entropy` divides by it.
    """
    return np.asarray(header.visible_keys, dtype=np.float64) + float(header.learned_sinks)


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of the message header (the arrays travel as the binary payload)."""
    schema = MessageHeader.model_json_schema()
    schema["$comment"] = (
        "headwatch head-stats header, schema "
        f"{SCHEMA_VERSION}; frame: b'HWS', u8 major, u32 header length, header, zlib payload"
    )
    return schema
