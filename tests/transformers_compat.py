"""The transformers rename the tests meet: the keyword a model's forward takes its KV cache by.

transformers 5.2x renamed `past_key_values` to `cache` and warns that the old name goes in 5.40;
the collector reads either (`collector.hook.pass_inputs`), and tests pass the one the model takes.
"""

from __future__ import annotations

import inspect

import torch


def cache_keyword(model: torch.nn.Module) -> str:
    """Return "cache" when the model's forward takes that keyword, else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
