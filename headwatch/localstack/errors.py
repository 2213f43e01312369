"""Errors raised by the local stack: each names what went wrong and how to fix it."""

from __future__ import annotations


class LocalStackError(RuntimeError):
    """Base class for failures of the local stack's environment or services."""


class MissingToolError(LocalStackError):
    """A program the stack needs (java, mvn, prometheus, alertmanager) is absent or too old."""


class CheckoutNotFoundError(LocalStackError):
    """The deploy/local/ files are not next to the package (an install without a source checkout)."""


class KafkaFetchError(LocalStackError):
    """Maven could not fetch the Kafka jars; carries the tail of Maven's output."""


class ServiceStartError(LocalStackError):
    """A service exited or did not become ready in time; carries the tail of its log."""


class PortUnavailableError(LocalStackError):
    """A port that was asked for explicitly is taken by another process."""


class StackConfigError(ValueError):
    """A value given to the stack is malformed (a template value, a job name, an address)."""


class StateFileError(ValueError):
    """The stack's state file cannot be read as a state written by `headwatch stack up`."""
