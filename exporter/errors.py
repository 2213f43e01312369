"""Errors of the exporter. Bad values are ValueError subclasses that say what was expected."""

from __future__ import annotations


class ExporterError(Exception):
    """Base of the exporter's own errors."""


class ReferenceRecordError(ExporterError, ValueError):
    """A record of the reference topic that cannot be decoded."""


class BrokerUnavailableError(ExporterError):
    """The broker cannot be reached or refuses this client; the process exits non-zero."""


class ModelNotFoundError(ExporterError, ValueError):
    """A command named a model the reference topic does not know."""
