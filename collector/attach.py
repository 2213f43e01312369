"""attach(): measure a transformers model's attention from inside the process that serves it.

Usage:
    sink = MemorySink()
    with attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0): model(ids)

Fails fast here (bad settings, unsupported model or attention implementation, a metrics port
in use), leaving nothing behind; never raises once attached.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import sys
import time
import types
from collections.abc import Callable
from types import TracebackType
from typing import Any

from torch import nn

from collector.assemble import Identity, Layout, config_hash
from collector.errors import SettingsError
from collector.hook import Probe, install, set_probe, text_config, uninstall
from collector.metrics import CollectorMetrics
from collector.publish import FileSink, KafkaSink, MemorySink, Sink
from collector.runtime import ErrorGuard, PassCollector
from collector.sampling import Sampler, SamplingPolicy
from collector.settings import CollectorSettings, load_settings
from collector.stats import StatsSpec
from collector.support import check_supported

_PROBE_ATTR = "_headwatch_probe"


def build_sink(settings: CollectorSettings, metrics: CollectorMetrics) -> Sink:
    """Return the sink the settings name (kafka, file or memory)."""
    if settings.sink == "kafka":
        return KafkaSink(settings.kafka, metrics)
    if settings.sink == "file":
        return FileSink(settings.file_path)
    return MemorySink()


def model_identity(model: nn.Module, settings: CollectorSettings) -> Identity:
    """Return the model and server identity carried by every message."""
    config: Any = model.config
    name = (
        settings.model_name
        or str(getattr(config, "_name_or_path", "") or "")
        or str(getattr(config, "model_type", "") or type(model).__name__)
    )
    revision = settings.model_revision or str(getattr(config, "_commit_hash", "") or "")
    server = settings.server_id or f"{socket.gethostname()}:{os.getpid()}"
    return Identity(name, revision, config_hash(config.to_dict()), server)


class AttachHandle:
    """An attached collector; `close()` (or leaving the `with` block) removes every trace of it."""

    def __init__(
        self,
        model: nn.Module,
        settings: CollectorSettings,
        sink: Sink,
        metrics: CollectorMetrics,
        collector: PassCollector,
        owns: tuple[bool, bool],
        undo: list[Callable[[], None]],
    ) -> None:
        self.model = model
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.collector = collector
        self._owns_sink, self._owns_metrics = owns
        self._undo = undo
        self.closed = False

    @property
    def enabled(self) -> bool:
        """Return whether the hook still measures (False after N consecutive failures)."""
        return self.collector.guard.enabled

    @property
    def errors(self) -> int:
        """Return how many failures the hook caught."""
        return self.collector.guard.errors

    def close(self, timeout_seconds: float | None = None) -> None:
        """Remove the hooks and wrappers; close the sink and endpoint this handle created."""
        if self.closed:
            return
        self.closed = True
        for undo in reversed(self._undo):
            undo()
        if self._owns_sink:
            self.sink.close(timeout_seconds)
        if self._owns_metrics:
            self.metrics.close()

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def attach(
    model: nn.Module,
    *,
    sink: Sink | str | None = None,
    settings: CollectorSettings | None = None,
    metrics: CollectorMetrics | None = None,
    rng: random.Random | None = None,
    **overrides: Any,
) -> AttachHandle:
    """Attach the collector to a model and return a handle (a context manager).

    `sink` is a Sink object, or the name of one the settings build ("kafka", "file", "memory").
    Keyword overrides are CollectorSettings fields (e.g. sample_rate=1.0); the rest comes from
    `settings` or `HEADWATCH_COLLECTOR_*` variables. Raises SettingsError or UnsupportedModelError.
    """
    if isinstance(sink, str):
        overrides["sink"], sink = sink, None
    elif sink is not None and not callable(getattr(sink, "publish", None)):
        raise SettingsError(
            "sink: expected a Sink (an object with publish() and close(), e.g. MemorySink()) "
            f"or one of 'kafka', 'file', 'memory', got {type(sink).__name__}"
        )
    settings = load_settings(settings, **overrides)
    _, modules = check_supported(model)
    num_layers = int(text_config(model).num_hidden_layers)
    if settings.layers is not None and max(settings.layers, default=0) >= num_layers:
        raise SettingsError(f"layers: expected indices below {num_layers}, got {settings.layers}")
    if any(_PROBE_ATTR in m.__dict__ for _, m in modules):
        raise SettingsError(
            f"expected a model without a collector attached, got {type(model).__name__} already attached"
        )
    owns_metrics = metrics is None
    metrics = metrics if metrics is not None else CollectorMetrics()
    owns_sink = sink is None
    # If a step fails, what the earlier ones installed is removed and what they started (the
    # endpoint, a sink built here; never the caller's) is closed, in reverse order.
    started: list[Callable[[], None]] = []
    undo: list[Callable[[], None]] = []
    try:
        if owns_metrics and settings.metrics_port is not None:
            started.append(metrics.close)
            serve_metrics(metrics, settings.metrics_port, settings.metrics_address)
        if sink is None:
            sink = build_sink(settings, metrics)
            started.append(functools.partial(sink.close, 0.0))
        collector = _collector(model, settings, sink, metrics, num_layers, rng)
        targets = install(modules)
        undo.append(lambda: uninstall(targets))
        for layer, module in modules:
            set_probe(module, Probe(layer, collector))
            undo.append(functools.partial(set_probe, module, None))
        pre = model.register_forward_pre_hook(collector.before_pass, with_kwargs=True)
        undo.append(pre.remove)
        post = model.register_forward_hook(collector.after_pass, with_kwargs=True, always_call=True)
        undo.append(post.remove)
    except BaseException:
        for step in [*reversed(undo), *reversed(started)]:
            step()
        raise
    return AttachHandle(model, settings, sink, metrics, collector, (owns_sink, owns_metrics), undo)


def serve_metrics(metrics: CollectorMetrics, port: int, address: str) -> int:
    """Start the metrics endpoint and return its port; SettingsError naming the port if it cannot."""
    try:
        return metrics.serve(port, address)
    except OSError as exc:
        raise SettingsError(
            f"metrics_port: expected a port free to serve metrics on {address}, got {port} "
            f"({exc.strerror or exc})"
        ) from exc


def _collector(
    model: nn.Module,
    settings: CollectorSettings,
    sink: Sink,
    metrics: CollectorMetrics,
    num_layers: int,
    rng: random.Random | None,
) -> PassCollector:
    """Return the collector of a model's passes, publishing to `sink`, its counters at 0."""
    identity = model_identity(model, settings)
    top_k = settings.effective_top_k()
    layout = Layout(
        num_layers, settings.sink_tokens, settings.recent_tokens, top_k, settings.sample_rate,
        settings.top_middle_positions,
    )  # fmt: skip
    policy = SamplingPolicy(
        sample_rate=settings.sample_rate,
        min_context_tokens=settings.min_context_tokens,
        decode_every=settings.decode_every,
        max_decode_samples=settings.max_decode_samples,
        layers=settings.layers,
        max_passes_per_second=settings.max_sampled_passes_per_second,
    )
    sampler = Sampler(policy, rng or random.Random(settings.seed), time.monotonic)
    name = identity.model_name
    metrics.hook_enabled.labels(model_name=name).set(1)
    # Export zeros from the start, so dashboards show 0 (not 'no data') on a healthy server.
    for counter in (metrics.sampled, metrics.published, metrics.hook_errors):
        counter.labels(model_name=name)
    guard = ErrorGuard(
        settings.max_consecutive_errors,
        settings.error_log_interval_seconds,
        on_error=lambda: metrics.hook_errors.labels(model_name=name).inc(),
        on_disable=lambda: metrics.hook_enabled.labels(model_name=name).set(0),
    )
    spec = StatsSpec(
        top_k=top_k, chunk_keys=settings.chunk_keys, middle_keys=settings.top_middle_positions
    )
    return PassCollector(sampler, spec, identity, layout, sink.publish, metrics, guard)


class _CallableModule(types.ModuleType):
    """This module, callable as `attach`.

    Importing `collector.attach` makes Python set the package attribute `collector.attach` to this
    module, shadowing the lazily exported function; calling the module calls the function, so
    `from collector import attach; attach(model, ...)` works in every import order.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> AttachHandle:
        return attach(model, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
