"""Errors raised by the training package."""

from __future__ import annotations


class TrainingError(ValueError):
    """Base class for bad input to the training code."""


class CorpusMissingError(TrainingError):
    """A Debian package that provides part of the corpus is not installed."""


class ConfigError(TrainingError):
    """A training option is out of range."""


class CheckpointError(TrainingError):
    """A checkpoint to resume from is missing or unreadable."""
