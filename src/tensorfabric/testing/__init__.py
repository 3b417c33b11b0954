"""Test helpers shipped with tensorfabric: the transport conformance suite (needs pytest)
and, in :mod:`tensorfabric.testing.netns`, emulated multi-NIC links."""

from __future__ import annotations

from typing import Any

__all__ = ["Pair", "TransportConformance"]


def __getattr__(name: str) -> Any:  # pytest is imported only when the suite is used
    if name in __all__:
        from . import _conformance

        return getattr(_conformance, name)
    raise AttributeError(name)
