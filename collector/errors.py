"""Errors the collector raises at attach time; at run time it never raises into the server."""

from __future__ import annotations


class CollectorError(Exception):
    """Base of every collector error."""


class SettingsError(CollectorError, ValueError):
    """A setting outside its domain: the message says what was expected and what arrived."""


class UnsupportedModelError(CollectorError, ValueError):
    """A model or attention implementation the hook cannot measure exactly; the message names it."""
