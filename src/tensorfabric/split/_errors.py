"""Errors of the split (edge/cloud) layer, rooted in the engine's error tree."""

from __future__ import annotations

from .._errors import ConfigError, TensorFabricError


class SplitError(TensorFabricError):
    """Base class of edge/cloud serving errors."""


class SplitConfigError(SplitError, ConfigError):
    """The deployment config is invalid; the message names the key and what is allowed."""


class CloudUnavailable(SplitError):
    """The cloud tier did not answer (down, unreachable, too slow, or its breaker is open)."""


class Overloaded(SplitError):
    """Too many requests are waiting at this tier; retry later (HTTP 429/503)."""
