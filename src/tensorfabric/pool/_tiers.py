"""Replica classes that run the serve tiers of :mod:`tensorfabric.split` in a pool.

``run: {serve: cloud, config: {...}}`` in a deployment spec runs :class:`CloudTierReplica`:
the split work's cloud tier (chat generation and layer-split steps over the engine). Edges
stay on the edge devices; they reach the tier at the engine address its replica reports
(``handle.call(method="address")``), which changes when failover re-places the replica.
"""

from __future__ import annotations

import threading
from typing import Any

SERVE_TIERS = {"cloud": "tensorfabric.pool._tiers:CloudTierReplica"}


class CloudTierReplica:
    """One cloud tier, listening on this node's Ray IP; ``config`` is a split deploy config."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        try:
            from tensorfabric.split import parse_config
            from tensorfabric.split._cloud import CloudTier
        except ImportError as exc:
            raise ImportError(
                "run.serve: cloud needs tensorfabric.split (the edge/cloud tiers) and its "
                f"extra on every pool node: pip install 'tensorfabric[llm]' ({exc})"
            ) from exc
        import ray

        data = dict(config or {})
        cloud = dict(data.get("cloud") or {})
        cloud.setdefault("host", ray.util.get_node_ip_address())
        data["cloud"] = cloud
        data.setdefault("secret", "env:TENSORFABRIC_SECRET")  # the pool's secret, never random
        self.tier = CloudTier(parse_config(data))
        self._thread = threading.Thread(target=self.tier.serve_forever, daemon=True)
        self._thread.start()

    def address(self) -> str:
        """The tier's engine address (hex), for the edge's ``cloud.address``."""
        return self.tier.address.hex()

    def __call__(self) -> str:
        return self.address()
