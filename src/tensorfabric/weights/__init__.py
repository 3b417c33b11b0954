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
from tensorfabric.weights._plan import CHECKSUMS, DEFAULT_CHECKSUM, Chunk, WeightPlan, checksum, fanout
from tensorfabric.weights._planner import Cluster, Prediction, kimi_k2, predict
from tensorfabric.weights._publisher import Faults, Publisher, PublishResult
from tensorfabric.weights._slots import SlotSet, Snapshot
from tensorfabric.weights._subscriber import Subscriber
from tensorfabric.weights._torch import bind_torch, model_tensors

__all__ = [
    # publishing and receiving
    "Publisher",
    "PublishResult",
    "Subscriber",
    "Snapshot",
    "SlotSet",
    "Faults",
    "bind_torch",
    "model_tensors",
    # the analytic planner
    "Cluster",
    "Prediction",
    "predict",
    "kimi_k2",
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
    "CHECKSUMS",
    "DEFAULT_CHECKSUM",
    # errors
    "WeightsError",
    "LayoutError",
    "UpdateRejected",
    "NoVersionError",
]
