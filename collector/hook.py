"""The attention hook: the only module that touches transformers.

Usage:
    wrappers = install(model)           # wraps the attention functions the model dispatches to
    probe_layers(model, observer)       # each attention module reports to `observer` on measured passes
    uninstall(wrappers)

The registered attention functions (`ALL_ATTENTION_FUNCTIONS`: sdpa and the flash variants) and
the model's own `eager_attention_forward` are replaced in place by a wrapper that always calls the
original kernel with the original arguments and returns its result unchanged. When the calling
module carries a probe, the probe sees the same tensors after the kernel ran. Wrappers are
reference-counted, so several attached models share them and the last detach restores them.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

SUPPORTED_IMPLEMENTATIONS = (
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
)
_PROBE_ATTR = "_headwatch_probe"
_lock = threading.Lock()
# target -> (original, wrapper, references); target is ("registry", key) or ("module", module name)
_installed: dict[tuple[str, str], tuple[Callable[..., Any], Callable[..., Any], int]] = {}
_previous_local: dict[str, Callable[..., Any] | None] = {}


class _InFlight:
    """How many measured passes run now, in any thread: while none does, a wrapper returns right
    after the kernel. `active` is the one attribute a wrapper reads (`_count > 0`, kept with it);
    torch.compile's trace returns before reading it."""

    def __init__(self) -> None:
        self.active = False
        # Set by a wrapper inside a compiled graph (a constant the graph stores on every call),
        # lowered when a measured pass is planned: a measured pass that saw no attention call
        # but finds it set ran its attention compiled.
        self.traced = False
        self._count = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        """A measured pass begins (the model's pre-hook planned it)."""
        with self._lock:
            self._count += 1
            self.active = True

    def leave(self) -> None:
        """A measured pass ended (the model's forward hook, which runs even when it raised)."""
        with self._lock:
            self._count -= 1
            self.active = self._count > 0


MEASURING = _InFlight()


class Observer(Protocol):
    """Receives the tensors of an attention call after the kernel ran, and what it returned."""

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
    ) -> None: ...


@dataclass(frozen=True)
class Probe:
    """Attached to an attention module: which layer it is and whom to tell."""

    layer: int
    observer: Observer


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def headwatch_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        result = original(module, query, key, value, attention_mask, *args, **kwargs)
        # Traced by torch.compile, the wrapper is the kernel alone: the compiled graph is the
        # bare model's (its passes go unmeasured; see PassCollector.before_pass). Asked first, so
        # that the trace reads (and guards on) nothing of ours.
        if torch.compiler.is_dynamo_compiling():
            MEASURING.traced = True
            return result
        if not MEASURING.active:
            return result
        # A dict lookup, not getattr: nn.Module.__getattr__ is slow on misses.
        probe = module.__dict__.get(_PROBE_ATTR)
        if probe is not None:
            if args:
                kwargs = {**_bind_positional(original, args), **kwargs}
            probe.observer.observe(
                probe.layer, module, query, key, value, attention_mask, kwargs, result
            )
        return result

    headwatch_attention.__headwatch_original__ = original  # type: ignore[attr-defined]
    return headwatch_attention


def _bind_positional(original: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, Any]:
    names = [p.name for p in inspect.signature(original).parameters.values()][5:]
    return dict(zip(names, args, strict=False))


def module_of(module: nn.Module) -> types.ModuleType:
    return sys.modules[type(module).__module__]


def _registry() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def install(modules: list[tuple[int, nn.Module]]) -> list[tuple[str, str]]:
    """Wrap the registered kernels and the modules' eager functions; return what was wrapped."""
    registry = _registry()
    targets: list[tuple[str, str]] = [
        ("registry", k) for k in SUPPORTED_IMPLEMENTATIONS if k in registry
    ]
    targets += sorted(
        {
            ("module", type(m).__module__)
            for _, m in modules
            if callable(getattr(module_of(m), "eager_attention_forward", None))
        }
    )
    with _lock:
        for target in targets:
            if target in _installed:
                original, wrapper, refs = _installed[target]
                _installed[target] = (original, wrapper, refs + 1)
                continue
            kind, name = target
            if kind == "registry":
                original = registry[name]
                _previous_local[name] = registry._local_mapping.get(name)
                wrapper = _wrap(original)
                registry[name] = wrapper
            else:
                python_module = sys.modules[name]
                original = python_module.eager_attention_forward
                wrapper = _wrap(original)
                python_module.eager_attention_forward = wrapper  # type: ignore[attr-defined]
            _installed[target] = (original, wrapper, 1)
    return targets


def uninstall(targets: list[tuple[str, str]]) -> None:
    """Drop one reference to each wrapper; the last reference restores the original in place."""
    registry = _registry()
    with _lock:
        for target in targets:
            original, wrapper, refs = _installed[target]
            if refs > 1:
                _installed[target] = (original, wrapper, refs - 1)
                continue
            del _installed[target]
            kind, name = target
            if kind == "registry":
                previous = _previous_local.pop(name, None)
                if previous is None:
                    registry._local_mapping.pop(name, None)
                else:
                    registry[name] = previous
            else:
                sys.modules[name].eager_attention_forward = original  # type: ignore[attr-defined]


def set_probe(module: nn.Module, probe: Probe | None) -> None:
    """Attach (or remove, with None) a probe to an attention module."""
    if probe is None:
        module.__dict__.pop(_PROBE_ATTR, None)
    else:
        module.__dict__[_PROBE_ATTR] = probe


def pass_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[int, int] | None, Any, Any]:
    """Return ((batch, query_len) or None, cache, attention mask as given) of a model's forward call.

    The mask is read with `collector.masks.padding_mask` on measured passes only.
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    shape = (
        (int(ids.shape[0]), int(ids.shape[1]))
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2
        else None
    )
    return shape, pass_cache(kwargs), kwargs.get("attention_mask")


def pass_cache(kwargs: dict[str, Any]) -> Any:
    """Return the cache a model's forward call was given, or None (it reads no tensor)."""
    # transformers 5.2x renamed `past_key_values` to `cache`; either may be given, or None
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def pass_position_ids(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Return the (batch, query_len) position ids of a model's forward call, if it was given any."""
    ids = kwargs.get("position_ids")
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def output_cache(output: Any) -> Any:
    """Return the cache object a model's forward returned, if any.

    ModelOutput is a dict; reading its keys avoids the deprecated `past_key_values` property.
    """
    if isinstance(output, dict):
        found = output.get("cache")
        return found if found is not None else output.get("past_key_values")
    return None


def text_config(model: nn.Module) -> Any:
    """Return the text part of a model's config."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config
