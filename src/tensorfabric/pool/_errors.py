"""Errors raised by the pool layer (all subclass :class:`tensorfabric.TensorFabricError`)."""

from __future__ import annotations

from .._errors import TensorFabricError


class PoolError(TensorFabricError):
    """Something in the GPU pool went wrong (cluster, controller, deployment)."""


class SpecError(PoolError):
    """A deployment spec or a node's labels are malformed; the message names the field."""


class PlacementError(PoolError):
    """A deployment cannot be placed; ``requirement`` names the requirement nothing met."""

    def __init__(self, message: str, *, requirement: str = "", deployment: str = "") -> None:
        super().__init__(message)
        self.requirement = requirement
        self.deployment = deployment

    def __reduce__(self) -> tuple[object, ...]:  # survive Ray's pickling
        return (_rebuild_placement_error, (str(self), self.requirement, self.deployment))


def _rebuild_placement_error(message: str, requirement: str, deployment: str) -> PlacementError:
    return PlacementError(message, requirement=requirement, deployment=deployment)


class VerificationError(PoolError):
    """A node's verification could not run (as opposed to running and failing its claims)."""


class ReplicaUnavailable(PoolError):
    """No replica of a deployment answered within the retry budget."""


class ControllerUnavailable(PoolError):
    """The pool controller does not answer right now (e.g. Ray is restarting it)."""
