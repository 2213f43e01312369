"""headwatch collector: exact per-head attention statistics from inside a serving process.

Usage:
    sink = MemorySink()
    with attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0): model(ids)

Imports are lazy so that `import collector.schema` (all the exporter needs) never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collector.attach import AttachHandle, attach
    from collector.publish import FileSink, KafkaSink, MemorySink

__all__ = ["AttachHandle", "FileSink", "KafkaSink", "MemorySink", "attach"]

_LAZY = {
    "attach": "collector.attach",
    "AttachHandle": "collector.attach",
    "MemorySink": "collector.publish",
    "FileSink": "collector.publish",
    "KafkaSink": "collector.publish",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'collector' has no attribute {name!r}")
