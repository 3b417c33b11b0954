"""Errors of the weights area (all are ``tensorfabric.TensorFabricError``)."""

from __future__ import annotations

from tensorfabric import TensorFabricError


class WeightsError(TensorFabricError):
    """Base of every error raised by ``tensorfabric.weights``."""


class LayoutError(WeightsError, ValueError):
    """A layout or mapping is inconsistent (unknown tensor, shape or dtype mismatch)."""


class UpdateRejected(WeightsError):
    """A replica refused a weight update (corrupt, incomplete or timed out); it keeps serving
    its previous version. ``version`` and ``replica`` say which one, ``reason`` why."""

    def __init__(self, message: str, *, version: int | None = None, replica: str | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.version = version
        self.replica = replica
        self.reason = reason


class NoVersionError(WeightsError):
    """A replica was read before any version had arrived."""
