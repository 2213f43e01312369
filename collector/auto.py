"""Zero-code attaching, the way `opentelemetry-instrument` works: every model the program loads is measured.

Usage (what `headwatch run` arranges through sitecustomize):
    install_import_hook()   # when transformers.modeling_utils is imported, from_pretrained is wrapped

Settings come from `HEADWATCH_COLLECTOR_*` variables. One sink and one metrics registry (and
endpoint) serve every model of the process; they are flushed and closed at exit. A model the
collector cannot measure is logged and left alone: the program itself is never stopped.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

_TARGET = "transformers.modeling_utils"
_lock = threading.Lock()
_state: dict[str, Any] = {}


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers.modeling_utils so the patch runs right after it executes."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                original_exec = loader.exec_module

                def exec_module(module: ModuleType, original_exec: Any = original_exec) -> None:
                    original_exec(module)
                    patch_transformers(module)

                loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


def install_import_hook() -> None:
    """Patch transformers now if it is loaded, else when it is imported."""
    if _TARGET in sys.modules:
        patch_transformers(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def patch_transformers(modeling_utils: ModuleType) -> None:
    """Wrap PreTrainedModel.from_pretrained so that each loaded model gets the collector attached."""
    base = modeling_utils.PreTrainedModel
    original = base.__dict__["from_pretrained"].__func__
    if getattr(original, "__headwatch__", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        model = original(cls, *args, **kwargs)
        attach_loaded(model)
        return model

    from_pretrained.__headwatch__ = True  # type: ignore[attr-defined]
    base.from_pretrained = classmethod(from_pretrained)


def attach_loaded(model: Any) -> None:
    """Attach the process-wide collector to a freshly loaded model; log, never raise."""
    from collector.attach import attach
    from collector.errors import CollectorError

    try:
        shared = _shared()
        handle = attach(
            model, sink=shared["sink"], metrics=shared["metrics"], settings=shared["settings"]
        )
    except CollectorError as exc:
        logger.warning("headwatch collector not attached to %s: %s", type(model).__name__, exc)
        return
    except Exception:
        logger.exception("headwatch collector failed to attach to %s", type(model).__name__)
        return
    with _lock:
        _state.setdefault("handles", []).append(handle)
    logger.info(
        "headwatch collector attached to %s (model=%s)",
        type(model).__name__,
        handle.collector.identity.model_name,
    )


def _shared() -> dict[str, Any]:
    with _lock:
        if "sink" not in _state:
            from collector.attach import build_sink, serve_metrics
            from collector.errors import SettingsError
            from collector.metrics import CollectorMetrics
            from collector.settings import load_settings

            settings = load_settings()
            metrics = CollectorMetrics()
            if settings.metrics_port is not None:
                try:
                    serve_metrics(metrics, settings.metrics_port, settings.metrics_address)
                except SettingsError as exc:  # measure anyway: the server must not notice
                    logger.warning("headwatch collector metrics not served: %s", exc)
            _state.update(settings=settings, metrics=metrics, sink=build_sink(settings, metrics))
            atexit.register(shutdown)
        return _state


def shutdown() -> None:
    """Detach every model, then flush and close the shared sink within its bound."""
    with _lock:
        handles = _state.pop("handles", [])
        sink = _state.pop("sink", None)
        metrics = _state.pop("metrics", None)
        _state.clear()
    for handle in handles:
        handle.close()
    if sink is not None:
        sink.close()
    if metrics is not None:
        metrics.close()


def chain_sitecustomize(own_file: str) -> None:
    """Run the next `sitecustomize` on sys.path, which ours shadows (as opentelemetry does)."""
    own_dir = os.path.dirname(os.path.abspath(own_file))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == own_dir:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location(
                "_headwatch_chained_sitecustomize", candidate
            )
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return
