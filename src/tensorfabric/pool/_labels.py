"""Node labels: what a provider claims about its node, as Ray node labels.

A node joins the Ray cluster with these labels (``ray start --labels``). They are *claims*:
Ray labels are set by whoever starts the node and cannot change while it runs, so the pool
never trusts them for ``verified``. Verification results live in the pool controller, and a
spec that requires verified nodes compiles to a selector on Ray's own ``ray.io/node-id``
label (see :mod:`tensorfabric.pool._compile`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ._errors import SpecError

PREFIX = "tensorfabric.io/"
REGION = PREFIX + "region"
ZONE = PREFIX + "zone"
COUNTRY = PREFIX + "country"
PROVIDER = PREFIX + "provider"
GPU_MODEL = PREFIX + "gpu"
GPU_MEMORY_GB = PREFIX + "gpu-memory-gb"
LINK_TIER = PREFIX + "link-tier"
SIMULATED = PREFIX + "simulated"
ROLE = PREFIX + "role"
JOIN_ID = PREFIX + "join-id"
NODE_ID = "ray.io/node-id"  # Ray's default label: the only one a provider cannot forge

PROVIDER_KINDS = ("datacenter", "miner", "consumer")

# io.net's connectivity tiers (download MB/s), lowest first. A node claiming a tier must
# measure at least this much on the verification transfer.
LINK_TIERS: dict[str, float] = {"low": 100.0, "medium": 400.0, "high": 800.0, "ultra": 1600.0}

_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def tiers_at_least(tier: str) -> list[str]:
    """Tier names at or above ``tier`` (e.g. ``high`` -> ``[high, ultra]``)."""
    if tier not in LINK_TIERS:
        raise SpecError(f"unknown link tier {tier!r}; use one of {', '.join(LINK_TIERS)}")
    names = list(LINK_TIERS)
    return names[names.index(tier) :]


def check_value(name: str, value: str) -> str:
    """Validate one label value against Ray's (Kubernetes') label syntax."""
    if not _VALUE.match(value):
        raise SpecError(
            f"{name}={value!r} is not a valid label value: use 1-63 letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit"
        )
    return value


def format_gb(value: float) -> str:
    """Label form of a memory size: ``24`` not ``24.0``."""
    return f"{value:g}"


@dataclass(frozen=True)
class NodeClaims:
    """What a provider says about its node. Becomes Ray node labels via :meth:`to_labels`."""

    region: str
    zone: str
    country: str = "XX"
    provider: str = "consumer"
    gpu_model: str = "none"
    gpu_memory_gb: float = 0.0
    link_tier: str = "low"
    simulated: bool = False  # fake GPUs (tests, laptops): verified against host memory
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("region", "zone", "country", "gpu_model"):
            check_value(name, getattr(self, name))
        if self.provider not in PROVIDER_KINDS:
            raise SpecError(
                f"provider={self.provider!r}: use one of {', '.join(PROVIDER_KINDS)}"
            )
        if self.link_tier not in LINK_TIERS:
            raise SpecError(f"link_tier={self.link_tier!r}: use one of {', '.join(LINK_TIERS)}")
        if self.gpu_memory_gb < 0:
            raise SpecError(f"gpu_memory_gb={self.gpu_memory_gb} must be >= 0")

    def to_labels(self) -> dict[str, str]:
        """Ray node labels for ``ray start --labels`` / ``Cluster.add_node(labels=...)``."""
        labels = {
            REGION: self.region,
            ZONE: self.zone,
            COUNTRY: self.country,
            PROVIDER: self.provider,
            GPU_MODEL: self.gpu_model,
            GPU_MEMORY_GB: format_gb(self.gpu_memory_gb),
            LINK_TIER: self.link_tier,
        }
        if self.simulated:
            labels[SIMULATED] = "true"
        labels.update(self.extra)
        return labels

    def to_label_string(self) -> str:
        """The ``key=value,...`` form ``ray start --labels`` takes."""
        return ",".join(f"{k}={v}" for k, v in self.to_labels().items())

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> NodeClaims | None:
        """Claims of a pool node, or ``None`` for a node that did not join through the pool."""
        if REGION not in labels:
            return None
        try:
            return cls(
                region=labels[REGION],
                zone=labels.get(ZONE, labels[REGION]),
                country=labels.get(COUNTRY, "XX"),
                provider=labels.get(PROVIDER, "consumer"),
                gpu_model=labels.get(GPU_MODEL, "none"),
                gpu_memory_gb=float(labels.get(GPU_MEMORY_GB, "0") or 0),
                link_tier=labels.get(LINK_TIER, "low"),
                simulated=labels.get(SIMULATED) == "true",
            )
        except (SpecError, ValueError):
            return None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
