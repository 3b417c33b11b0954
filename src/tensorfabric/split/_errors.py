"""Errors of the split (edge/cloud) layer, rooted in the engine's error tree."""

from __future__ import annotations

try:
    from tensorfabric import ConfigError as _ConfigBase
    from tensorfabric import TensorFabricError as _Base
except ImportError:  # TEMP: engine not merged yet in this checkout
    _Base = Exception  # type: ignore[misc,assignment]
    _ConfigBase = ValueError  # type: ignore[misc,assignment]


class SplitError(_Base):  # type: ignore[valid-type,misc]
    """Base class of edge/cloud serving errors."""


class SplitConfigError(SplitError, _ConfigBase):  # type: ignore[valid-type,misc]
    """The deployment config is invalid; the message names the key and what is allowed."""


class CloudUnavailable(SplitError):
    """The cloud tier did not answer (down, unreachable, too slow, or its breaker is open)."""


class Overloaded(SplitError):
    """Too many requests are queued at this tier; retry later (HTTP 429)."""
