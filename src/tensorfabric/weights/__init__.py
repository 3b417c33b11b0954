"""RL weight updates: publish new weights from a trainer to a fleet of inference replicas.

The plan (which replica bytes come from which trainer tensors, cut into chunks) is computed once
and replayed every step; writes are one-sided, pipelined and fanned out along a chain or tree;
replicas verify checksums and swap versions atomically. See docs/weights.md.
"""

from __future__ import annotations

from tensorfabric.weights._errors import LayoutError, NoVersionError, UpdateRejected, WeightsError
from tensorfabric.weights._layout import (
    DstTensor,
    Layout,
    LayoutMap,
    Part,
    TensorSpec,
    fuse,
    same_layout,
    shard,
    specs_of,
)
from tensorfabric.weights._plan import Chunk, WeightPlan, checksum, fanout

__all__ = [
    # layouts and plans
    "TensorSpec",
    "Part",
    "DstTensor",
    "Layout",
    "LayoutMap",
    "WeightPlan",
    "Chunk",
    "specs_of",
    "same_layout",
    "fuse",
    "shard",
    "fanout",
    "checksum",
    # errors
    "WeightsError",
    "LayoutError",
    "UpdateRejected",
    "NoVersionError",
]
