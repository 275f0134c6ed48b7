"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class MoekitError(Exception):
    """Base class of every error caused by user input (a wrong argument, file or field)."""


class ConfigError(MoekitError, ValueError):
    """A construction argument or option has a value moekit cannot use."""


class ShapeError(MoekitError, ValueError):
    """A tensor handed to moekit has the wrong shape or dtype."""


class RoutingError(MoekitError, ValueError):
    """Routing produced or received values that cannot be dispatched (NaN logits, bad indices)."""


class UnknownNameError(MoekitError, KeyError):
    """A registry lookup (router, activation, benchmark case) named something that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
