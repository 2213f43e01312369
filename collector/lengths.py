"""How many slots a KV cache already holds, read on the host without a device sync where possible.

Usage:
    lengths = CacheLengths()
    past = lengths.before_pass(cache, query_len)  # in the model's forward pre-hook, every pass

A `DynamicCache` answers from tensor shapes, on the host. A static cache (transformers 5's
`StaticLayer`) keeps its length in a device tensor, `cumulative_length`, so that compiled graphs do
not recompile; `int()` of it waits for the device: a sync on every pass, measured or not.

So the length is carried on the host from pass to pass. A pass over a cache adds its query length
to the cache and does one in-place `add_` on that tensor, and torch bumps a tensor's version
counter on every in-place operation. When the tensor seen now is the one seen at the previous pass
(or, after a lazy initialisation, a fresh one) and its version is exactly one higher, nothing but
that pass touched it, and the length is the previous length plus that pass's query length.
Anything else (a reset between two `generate()` calls, a crop, a pass on an unwatched model, a
cache made under `torch.inference_mode`, whose tensors keep no version) reads the tensor once.
So does the first pass after compiled ones, which `mark_compiled` flags on the cache: a CUDA
graph's replay updates the tensor without bumping its version.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class _Seen:
    """What a pass left a cache with: its length tensor (None: the length was a host int) and that
    tensor's version before the pass, and the length after it."""

    tensor: torch.Tensor | None
    version: int
    length_after: int


class CacheLengths:
    """The host-side length of each cache the model's passes use (weakly keyed by cache)."""

    def __init__(self) -> None:
        self._seen: weakref.WeakKeyDictionary[Any, _Seen] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.device_reads = 0  # how many times a length tensor was read (a sync on a GPU)

    def before_pass(self, cache: Any, query_len: int) -> int:
        """Return how many slots `cache` holds before a pass of `query_len` tokens, and remember
        what the pass will leave it with."""
        length = cache.get_seq_length()
        if not isinstance(length, torch.Tensor):
            past = int(length)
            # 0 may be a static layer not yet initialised: its first pass makes the tensor.
            if past == 0:
                self._remember(cache, _Seen(None, 0, query_len))
            return past
        version = _version(length)
        with self._lock:
            seen = self._seen.get(cache)
        fields = getattr(cache, "__dict__", None)
        ran_compiled = bool(fields and fields.pop(_RAN_COMPILED, False))
        if (
            seen is not None
            and version is not None
            and not ran_compiled
            and _untouched(seen, length, version)
        ):
            past = seen.length_after
        else:
            past = int(length)  # the one read of the device
            self.device_reads += 1
        if version is not None:
            self._remember(cache, _Seen(length, version, past + query_len))
        return past

    def forget(self, cache: Any) -> None:
        """Drop what the last pass over `cache` expected: it raised, maybe before its update."""
        with self._lock:
            self._seen.pop(cache, None)

    def _remember(self, cache: Any, seen: _Seen) -> None:
        try:
            with self._lock:
                self._seen[cache] = seen
        except TypeError:  # a cache that takes no weak reference is read every pass
            pass


_RAN_COMPILED = "_headwatch_ran_compiled"


def mark_compiled(cache: Any) -> None:
    """Flag, from a compiled pass, that `cache` was updated where versions may not move.

    Runs inside torch.compile's trace: it stores a constant (reading a value there would make
    the compiled code guard on it, and recompile when it changes).
    """
    if cache is not None and hasattr(cache, "__dict__"):
        setattr(cache, _RAN_COMPILED, True)


def _untouched(seen: _Seen, length: torch.Tensor, version: int) -> bool:
    """Whether only the previous pass's own update touched the length tensor since it was seen."""
    if seen.tensor is None:
        # The previous pass read a host int (an uninitialised static layer answers 0): its update
        # created the tensor (a device copy at lazy initialisation) or bumped a fresh one once.
        return version == 1
    return length is seen.tensor and version == seen.version + 1


def _version(tensor: torch.Tensor) -> int | None:
    """Return a tensor's version counter, or None for an inference tensor (it keeps none)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None
