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

from collector.errors import UnsupportedModelError

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


def attention_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """Return (layer index, module) for every self-attention module of the model."""
    found = []
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and type(module).__name__.endswith("Attention"):
            if getattr(module, "is_cross_attention", False):
                continue
            found.append((layer, module))
    return found


def check_supported(model: nn.Module) -> tuple[str, list[tuple[int, nn.Module]]]:
    """Return the attention implementation and modules, or raise UnsupportedModelError naming why."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"expected a transformers PreTrainedModel with a config, got {type(model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"expected a decoder-only model, got encoder-decoder {type(model).__name__}"
        )
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"expected attention implementation in {SUPPORTED_IMPLEMENTATIONS}, got {implementation!r} "
            f"for {type(model).__name__}"
        )
    modules = attention_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"expected attention modules with a layer_idx, got none in {type(model).__name__}"
        )
    if implementation == "eager":
        for _, module in modules:
            if not callable(getattr(_module_of(module), "eager_attention_forward", None)):
                raise UnsupportedModelError(
                    f"expected {type(module).__module__} to define eager_attention_forward, got none "
                    f"({type(module).__name__} cannot be measured with attention implementation 'eager')"
                )
    return implementation, _dispatching_modules(model, implementation, modules)


# GPT-2's `reorder_and_upcast_attn` (also in ImageGPT and Decision Transformer) makes the eager
# path call the module's own `_upcast_and_reordered_attn` instead of `eager_attention_forward`.
_OWN_EAGER_FLAGS = ("reorder_and_upcast_attn",)


def _dispatching_modules(
    model: nn.Module, implementation: str, modules: list[tuple[int, nn.Module]]
) -> list[tuple[int, nn.Module]]:
    """Return the modules whose attention goes through a function `install` wraps; raise
    UnsupportedModelError naming the class when some layer's attention does not.

    A static check of the code (no probe pass): the module class must refer to the registry
    (`ALL_ATTENTION_FUNCTIONS`) or, under eager, to `eager_attention_forward`. Falcon, say, reports
    sdpa support but calls torch's kernel from its own forward, so the wrapper never sees it.
    A wrapper module that shares its layer index with one that dispatches (BERT's `BertAttention`
    around `BertSelfAttention`) is left out rather than refused.
    """
    needed = "eager_attention_forward" if implementation == "eager" else "ALL_ATTENTION_FUNCTIONS"
    names = {cls: _class_names(cls) for cls in {type(m) for _, m in modules}}
    kept = [(layer, m) for layer, m in modules if needed in names[type(m)]]
    measured = {layer for layer, _ in kept}
    for layer, module in modules:
        if layer not in measured:
            raise UnsupportedModelError(
                f"expected attention modules that call transformers' {needed} for attention "
                f"implementation {implementation!r}, got {type(module).__name__} (layer {layer}) of "
                f"{type(model).__name__}, which computes attention in its own code"
            )
    if implementation == "eager":
        for _, module in kept:
            for flag in _OWN_EAGER_FLAGS:
                if getattr(module, flag, False) is True:
                    raise UnsupportedModelError(
                        f"expected {flag}=False with attention implementation 'eager', got True for "
                        f"{type(model).__name__} ({type(module).__name__} then computes attention "
                        "in its own code)"
                    )
    return kept


def _class_names(cls: type) -> set[str]:
    """Return the global names the methods of an nn.Module subclass refer to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            continue
        for value in vars(klass).values():
            function = inspect.unwrap(value) if callable(value) else None
            code = getattr(function, "__code__", None)
            if isinstance(code, types.CodeType):
                names |= _code_names(code)
    return names


def _code_names(code: types.CodeType) -> set[str]:
    """Return the names a code object and the functions nested in it refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _module_of(module: nn.Module) -> types.ModuleType:
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
            if callable(getattr(_module_of(m), "eager_attention_forward", None))
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

    The mask is read with `padding_mask` on measured passes only.
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    shape = (
        (int(ids.shape[0]), int(ids.shape[1]))
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2
        else None
    )
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return shape, cache, kwargs.get("attention_mask")


def padding_mask(mask: Any) -> torch.Tensor | None:
    """Return the mask of a forward call that shows padding: 2-D (batch, slots) 0/1, 4-D as the
    kernels take it, or None when there is none (no padding); raise ValueError for other forms.

    `generate()` with a static cache passes a 4-D mask, or for models with several layer types
    (`config.layer_types`) a dict of them by type; the full-attention one hides no real token.
    """
    if isinstance(mask, dict):
        tensors = [m for m in mask.values() if m is not None]
        mask = mask.get("full_attention", tensors[0] if tensors else None)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"expected a 2-D or 4-D attention mask, got {shape}")
    return mask


def pass_position_ids(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Return the (batch, query_len) position ids of a model's forward call, if it was given any."""
    ids = kwargs.get("position_ids")
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def cache_length(cache: Any) -> int:
    """Return how many slots a cache already holds (0 for None). DynamicCache answers from shapes."""
    if cache is None:
        return 0
    length = cache.get_seq_length()
    return int(length)


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
