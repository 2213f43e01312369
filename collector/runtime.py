"""What runs inside the serving process for one attached model: pass decisions and measurements.

Usage:
    collector = PassCollector(sampler, spec, identity, layout, emit, metrics, guard)
    model.register_forward_pre_hook(collector.before_pass, with_kwargs=True)

Decisions are made in the model's forward pre-hook on the host; on unmeasured passes the attention
hook does one dict lookup and one thread-local read and touches no tensor. Every body that runs
inside the forward pass sits under the error guard: failures are counted, logged at a limited
rate, and the collector disables itself after N consecutive failures. Nothing raises into the server.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from collector.assemble import Identity, Layout, assemble
from collector.hook import MEASURING, output_cache, pass_cache, pass_inputs, pass_position_ids
from collector.lengths import CacheLengths, mark_compiled
from collector.masks import padding_mask, padding_rows
from collector.metrics import UNMEASURED_REASONS, CollectorMetrics
from collector.plan import PassPlan, Phase, layer_inputs, plan_rows
from collector.sampling import RequestState, Sampler
from collector.schema import HeadStatsMessage
from collector.stats import StatsSpec, finish, finish_stacked, layer_pass

logger = logging.getLogger(__name__)


class ErrorGuard:
    """Counts failures, logs the first traceback then at most one line per interval, disables after N in a row."""

    def __init__(
        self,
        max_consecutive: int,
        log_interval_seconds: float,
        on_error: Callable[[], None],
        on_disable: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_consecutive = max_consecutive
        self.log_interval_seconds = log_interval_seconds
        self.enabled = True
        self.errors = 0
        self.consecutive = 0
        self._on_error = on_error
        self._on_disable = on_disable
        self._clock = clock
        self._last_log = -float("inf")
        self._lock = threading.Lock()

    def failed(self, where: str) -> None:
        """Record one failure of `where` (call from inside an `except` block)."""
        with self._lock:
            self.errors += 1
            self.consecutive += 1
            first = self.errors == 1
            now = self._clock()
            if first or now - self._last_log >= self.log_interval_seconds:
                self._last_log = now
                logger.warning(
                    "headwatch collector: %s failed (%d errors so far)",
                    where,
                    self.errors,
                    exc_info=first,
                )
            disable = self.enabled and self.consecutive >= self.max_consecutive
            if disable:
                self.enabled = False
        self._on_error()
        if disable:
            logger.error(
                "headwatch collector disabled after %d consecutive failures", self.consecutive
            )
            self._on_disable()

    def succeeded(self) -> None:
        """Reset the consecutive-failure count."""
        self.consecutive = 0


class PassCollector:
    """Decides per pass, measures on the attention hook, assembles after the last layer."""

    def __init__(
        self,
        sampler: Sampler,
        spec: StatsSpec,
        identity: Identity,
        layout: Layout,
        emit: Callable[[HeadStatsMessage], None],
        metrics: CollectorMetrics,
        guard: ErrorGuard,
    ) -> None:
        self.sampler = sampler
        self.spec = spec
        self.identity = identity
        self.layout = layout
        self._emit = emit
        # The labelled children, looked up once: labels() takes a lock and a dict lookup per call.
        self._sampled = metrics.sampled.labels(model_name=identity.model_name)
        self._stats_seconds = metrics.stats_seconds.labels(model_name=identity.model_name)
        self.guard = guard
        self._local = threading.local()
        self._requests: weakref.WeakKeyDictionary[Any, RequestState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.lengths = CacheLengths()
        self.saw_compiled = False  # whether a pass ran under torch.compile (unmeasured)
        self._attention_compiled = False  # attention runs compiled under these hooks: no plans
        self._unmeasured = {
            reason: metrics.unmeasured.labels(model_name=identity.model_name, reason=reason)
            for reason in UNMEASURED_REASONS
        }
        self._told: set[str] = set()  # what `_tell_once` has logged

    # Forward pre-hook of the model: decide, on the host, whether this pass is measured.
    def before_pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():  # torch.compile's trace, or torch.export's
            if torch.compiler.is_dynamo_compiling():
                # Traced by torch.compile (generate's compiled decode steps on a GPU with a
                # static cache, `transformers serve --compile`, `model.compile()`): the hooks
                # trace to two constant stores, which the compiled code replays on every call
                # and guards on nothing, so its graph is the bare model's. Not measured.
                self.saw_compiled = True
                mark_compiled(pass_cache(kwargs))  # no shape read: it would specialise the trace
            return
        if getattr(self._local, "plan", None) is not None:  # a pass whose forward hook never ran
            MEASURING.leave()
        self._local.plan = None
        self._local.pending = None
        # Attention that runs compiled under uncompiled pass hooks (`model.forward =
        # torch.compile(model.forward)`, `model.model.compile()`), found by `after_pass`.
        compiled_attention = self._attention_compiled
        if compiled_attention:
            mark_compiled(pass_cache(kwargs))  # the next uncompiled pass reads the length
        if self.saw_compiled:
            self._tell_once("compiled", "passes run under torch.compile are not measured")
        if compiled_attention or not self.guard.enabled:
            return
        started = time.perf_counter()
        try:
            plan = self._local.plan = self._decide(args, kwargs)
        except Exception:
            self.guard.failed("pass decision")
            return
        if plan is not None:  # planning a measured pass counts as its cost
            MEASURING.traced = False  # a compiled graph running this pass's attention sets it
            MEASURING.enter()
            plan.stats_seconds += time.perf_counter() - started

    def _decide(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PassPlan | None:
        shape, cache, mask = pass_inputs(args, kwargs)
        if shape is None:
            return None
        batch, query_len = shape
        if cache is not None and not hasattr(cache, "get_seq_length"):
            # Continuous batching (`generate_batch`, `transformers serve --continuous-batching`)
            # packs many requests' tokens into one row over a PagedAttentionCache, with a block
            # mask: no cache per request, so no request to sample or position to plan.
            self._unmeasured_pass(
                "continuous_batching",
                f"passes over a {type(cache).__name__} (continuous batching) are not measured",
            )
            return None
        with self._lock:
            state = self._requests.get(cache) if cache is not None else None
        past = 0 if cache is None else self.lengths.before_pass(cache, query_len)
        total = past + query_len
        phase: Phase = "prefill"
        if state is None or past == 0:
            state = self.sampler.new_request(batch)
            if cache is not None:
                with self._lock:
                    self._requests[cache] = state
            else:
                self._local.pending = state
            measured = self.sampler.prefill_rows(state, total)
        elif query_len == 1:
            measured = self.sampler.decode_step(state, total)
            phase = "decode"
        else:
            measured = self.sampler.prefill_rows(state, total)
        if not measured:
            return None
        # A measured pass: reading the padding mask from the device is allowed here.
        chosen = [b for b, s in enumerate(state.sampled) if s]
        mask = padding_mask(mask)
        unseen = None
        if mask is None:
            rows = np.ones((len(chosen), total), dtype=np.int8)
        elif mask.dim() == 2:
            rows = mask[chosen].to("cpu", torch.int8).numpy()[:, -total:]
        else:
            rows, unseen = padding_rows(mask, chosen, past, query_len, pass_position_ids(kwargs))
        plans = plan_rows(
            rows, chosen, query_len, phase, self.layout.sink_tokens, self.layout.recent_tokens,
            unseen,
        )  # fmt: skip
        keep = self.sampler.long_enough([p.query_position + 1 for p in plans])
        plans = [p for p, ok in zip(plans, keep, strict=True) if ok]
        if not plans:
            return None
        return PassPlan(phase=phase, total_slots=total, query_len=query_len, rows=plans)

    # Called by the attention wrapper after the kernel ran.
    def observe(
        self,
        layer: int,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        kwargs: dict[str, Any],
        result: Any = None,
    ) -> None:
        plan: PassPlan | None = getattr(self._local, "plan", None)
        if plan is None:
            return
        plan.attention_calls += 1
        if not self.guard.enabled or not self.sampler.is_layer_sampled(layer):
            return
        started = time.perf_counter()
        try:
            # inference_mode: no autograd bookkeeping at all (cheaper per op than no_grad).
            with torch.inference_mode():
                self._measure(plan, layer, module, query, key, value, mask, kwargs, result)
            self.guard.succeeded()
            plan.stats_seconds += time.perf_counter() - started
        except Exception:
            self.guard.failed(f"statistics of layer {layer}")

    def _unmeasured_pass(self, reason: str, what: str) -> None:
        """Count a pass left unmeasured (not an error); log `what` the first time for `reason`."""
        self._unmeasured[reason].inc()
        self._tell_once(reason, what)

    def _tell_once(self, key: str, what: str) -> None:
        """Log a warning the first time `key` comes up."""
        if key not in self._told:
            self._told.add(key)
            logger.warning("headwatch collector: model=%s: %s", self.identity.model_name, what)

    def _measure(
        self,
        plan: PassPlan,
        layer: int,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        kwargs: dict[str, Any],
        result: Any = None,
    ) -> None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = bool(getattr(module, "is_causal", True))
        sinks = kwargs.get("s_aux")
        # The kernel's own output (attention functions return (output, weights)).
        output = result[0] if isinstance(result, tuple) and result else None
        inputs = layer_inputs(
            plan, query, key, value, mask, kwargs.get("sliding_window"), is_causal, sinks,
            output if isinstance(output, torch.Tensor) else None,
        )  # fmt: skip
        plan.partials[layer] = layer_pass(inputs, float(scaling), self.spec, kwargs.get("softcap"))
        plan.key_counts[layer] = key.shape[2]
        plan.layout.setdefault("kv_heads", key.shape[1])
        plan.layout.setdefault("head_dim", query.shape[-1])
        plan.layout.setdefault("kv_dtype_bytes", key.element_size())

    # Forward hook of the model (always called): assemble and hand the messages on.
    def after_pass(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if torch.compiler.is_compiling():
            return
        plan: PassPlan | None = getattr(self._local, "plan", None)
        pending: RequestState | None = getattr(self._local, "pending", None)
        self._local.plan = None
        self._local.pending = None
        if plan is not None:
            MEASURING.leave()
        try:
            if output is None:  # the forward raised: the cache may have missed its update
                cache = pass_cache(kwargs)
                if cache is not None:
                    self.lengths.forget(cache)
                return
            if pending is not None:
                cache = output_cache(output)
                if cache is not None:
                    with self._lock:
                        self._requests[cache] = pending
            if plan is None:
                return
            if plan.attention_calls == 0 and MEASURING.traced:
                # The attention ran inside a compiled graph while these hooks did not: a forward
                # or an inner model compiled on its own. Not measured, and from now on not planned.
                self._attention_compiled = self.saw_compiled = True
                mark_compiled(pass_cache(kwargs))
            elif plan.attention_calls == 0:
                # The model dispatches to a function the hook did not wrap: its attention
                # implementation changed after attach (`set_attn_implementation`).
                implementation = getattr(module.config, "_attn_implementation", None)
                self._unmeasured_pass(
                    "unwrapped_attention",
                    "a sampled pass called no attention function the collector wraps "
                    f"(the model's attention implementation is now {implementation!r}): "
                    "nothing was measured",
                )
            elif plan.partials:
                started = time.perf_counter()
                layers = sorted(plan.partials)
                partials = [plan.partials[layer] for layer in layers]
                with torch.inference_mode():
                    stacked = finish_stacked(partials, self.spec)
                    if stacked is None:
                        done = finish(partials, self.spec)
                        plan.results.update(zip(layers, done, strict=True))
                    else:
                        plan.stacked = (layers, *stacked)
                messages = assemble(plan, self.identity, self.layout)
                self._sampled.inc()
                self._stats_seconds.observe(plan.stats_seconds + time.perf_counter() - started)
                for message in messages:
                    self._emit(message)
                self.guard.succeeded()
        except Exception:
            self.guard.failed("message assembly")
