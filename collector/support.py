"""Which models the collector can measure: decided at attach time, from the model and its code.

Usage:
    implementation, modules = check_supported(model)  # UnsupportedModelError naming why not

A model is supported when it is a decoder whose attention modules carry a `layer_idx` and go
through a function `collector.hook.install` wraps: the `ALL_ATTENTION_FUNCTIONS` registry, or
the modeling module's own `eager_attention_forward` under eager. That is checked statically, from
the names the attention classes' code refers to; no probe pass runs.
"""

from __future__ import annotations

import inspect
import types

from torch import nn

from collector.errors import UnsupportedModelError
from collector.hook import SUPPORTED_IMPLEMENTATIONS, module_of


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
            if not callable(getattr(module_of(module), "eager_attention_forward", None)):
                raise UnsupportedModelError(
                    f"expected {type(module).__module__} to define eager_attention_forward, got none "
                    f"({type(module).__name__} cannot be measured with attention implementation 'eager')"
                )
    devices = sorted({str(p.device) for _, module in modules for p in module.parameters()})
    if len(devices) > 1:
        # The statistics of a pass's layers are finished together on one device; a model split
        # across devices (device_map="auto" on several GPUs, CPU offload) would fail every
        # sampled pass. Refused here, where it can be named, instead.
        raise UnsupportedModelError(
            f"expected the attention layers of {type(model).__name__} on one device, got "
            f"{', '.join(devices)} (a model split across devices is not measured)"
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
