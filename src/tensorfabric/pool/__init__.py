"""GPU pools on Ray: providers join with labels, deployments are placed by location and hardware.

Ray is the distributed engine (labels, label selectors, placement groups); tensorfabric adds
node verification, deployment specs compiled to selectors with ordered fallbacks, failover
across zones, and a Ray tensor transport over the tensorfabric engine.

Specs, labels and compilation need no Ray; the rest imports Ray when first used
(``pip install 'tensorfabric[ray]'``).
"""

from __future__ import annotations

from typing import Any

from ._compile import NodeView, Placement, compile_spec, match
from ._errors import (
    ControllerUnavailable,
    PlacementError,
    PoolError,
    ReplicaUnavailable,
    SpecError,
    VerificationError,
)
from ._labels import LINK_TIERS, PROVIDER_KINDS, NodeClaims
from ._spec import DeploymentSpec, RunSpec

__all__ = [
    # specs and labels (no Ray needed)
    "DeploymentSpec",
    "RunSpec",
    "NodeClaims",
    "LINK_TIERS",
    "PROVIDER_KINDS",
    "NodeView",
    "Placement",
    "compile_spec",
    "match",
    # talking to a pool (Ray)
    "Pool",
    "DeploymentHandle",
    "connect",
    # tensors between Ray actors over the engine (Ray + torch)
    "TensorFabricTransport",
    "register_transport",
    "TRANSPORT_NAME",
    # errors
    "PoolError",
    "SpecError",
    "PlacementError",
    "VerificationError",
    "ReplicaUnavailable",
    "ControllerUnavailable",
]

_LAZY = {
    "Pool": "._client",
    "DeploymentHandle": "._client",
    "connect": "._client",
    "TensorFabricTransport": "._transport",
    "register_transport": "._transport",
    "TRANSPORT_NAME": "._transport",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
