"""Errors of the demo, `analyze`, `policy`, the validation and the report writer.

Each is a ValueError subclass whose message says what was expected and what arrived.
"""

from __future__ import annotations


class HeadwatchToolError(ValueError):
    """Base class: bad input to one of the research commands."""


class PromptError(HeadwatchToolError):
    """A prompt that cannot be built or read."""


class ModelFilesError(HeadwatchToolError):
    """A model directory with a missing or unreadable file; the message names the file."""


class ContextTooLongError(HeadwatchToolError):
    """A prompt longer than the model's context."""


class PolicyError(HeadwatchToolError):
    """A verdict source or policy file that cannot be read or does not fit the model."""


class ReportError(HeadwatchToolError):
    """A report that cannot be written."""


class PortInUseError(HeadwatchToolError):
    """The /metrics port is taken by another process."""
