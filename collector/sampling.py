"""Which forward passes, sequences, query positions and layers to measure.

Usage:
    sampler = Sampler(SamplingPolicy(sample_rate=0.01), rng=random.Random(0), clock=time.monotonic)
    state = sampler.new_request(batch=2, context_tokens=[900, 1200])

Pure: no torch, no I/O. Randomness and time are injected so decisions are reproducible in tests.
Every decision is made on the host from shapes and counters, before the pass runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingPolicy:
    """Sampling knobs (validated by CollectorSettings)."""

    sample_rate: float = 0.01
    min_context_tokens: int = 512
    decode_every: int = 0  # 0: only the last prompt token; k: also every k-th decode step
    max_decode_samples: int = 8
    layers: tuple[int, ...] | None = None
    max_passes_per_second: float = 2.0


@dataclass
class RequestState:
    """What the sampler decided for one request (one cache), per batch entry."""

    sampled: list[bool]
    decode_steps: int = 0
    decode_samples: int = 0
    extra: dict[str, object] = field(default_factory=dict)


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts up to max(1, rate)."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate)
        self._tokens = self._capacity
        self._clock = clock
        self._last = clock()

    def try_acquire(self) -> bool:
        """Take one token if there is one; return whether it was taken."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Sampler:
    """Decides, per request and per pass, which sequences are measured."""

    def __init__(
        self, policy: SamplingPolicy, rng: random.Random, clock: Callable[[], float]
    ) -> None:
        self.policy = policy
        self._rng = rng
        self._bucket = TokenBucket(policy.max_passes_per_second, clock)

    def new_request(self, batch: int) -> RequestState:
        """Draw, for each sequence of a new request, whether it is sampled (rate only)."""
        rate = self.policy.sample_rate
        return RequestState(
            sampled=[rate >= 1.0 or self._rng.random() < rate for _ in range(batch)]
        )

    def prefill_rows(self, state: RequestState, upper_bound_context: int) -> bool:
        """Return whether the prompt pass may be measured: any sequence drawn, long enough, budget left.

        `upper_bound_context` is the padded length (a host-side bound); exact per-sequence lengths
        are checked with `long_enough` once the pass is known to be measured.
        """
        if not any(state.sampled) or upper_bound_context < self.policy.min_context_tokens:
            return False
        return self._bucket.try_acquire()

    def decode_step(self, state: RequestState, upper_bound_context: int) -> bool:
        """Count one decode step; return whether it is measured (every k-th step, up to a cap)."""
        state.decode_steps += 1
        every = self.policy.decode_every
        if every <= 0 or not any(state.sampled) or state.decode_steps % every:
            return False
        if state.decode_samples >= self.policy.max_decode_samples:
            return False
        if upper_bound_context < self.policy.min_context_tokens or not self._bucket.try_acquire():
            return False
        state.decode_samples += 1
        return True

    def long_enough(self, context_tokens: Sequence[int]) -> list[bool]:
        """Return, per sequence, whether its real context reaches the minimum."""
        return [c >= self.policy.min_context_tokens for c in context_tokens]

    def is_layer_sampled(self, layer: int) -> bool:
        """Return whether a layer is measured."""
        layers = self.policy.layers
        return layers is None or layer in layers
