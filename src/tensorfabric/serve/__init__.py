"""The OpenAI-compatible HTTP API (FastAPI + uvicorn) in front of the edge/cloud tiers.

    tensorfabric serve                      # default deployment, prints the URL
    tensorfabric serve --config serve.yaml  # see docs/serve.md

FastAPI, uvicorn and prometheus-client load on use: ``pip install 'tensorfabric[serve]'``.
"""

from __future__ import annotations

from ._launch import CloudProcess, build_edge, launch, start_cloud_process
from ._process import ServerProcess


def create_app(*args, **kwargs):
    """Build the FastAPI app for an :class:`~tensorfabric.split._edge.EdgeTier` (lazy import)."""
    from ._app import create_app as _create

    return _create(*args, **kwargs)


__all__ = [
    "CloudProcess", "ServerProcess", "build_edge", "create_app", "launch", "start_cloud_process",
]
