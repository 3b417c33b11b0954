"""Paged KV cache and disaggregated prefill/decode over the engine.

Layout and allocator need numpy only; the cache, workers and cluster need
``pip install 'tensorfabric[llm]'`` and are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._allocator import BlockAllocator, BlockTable
from ._errors import (
    BlockStateError,
    KVCacheFullError,
    KVError,
    LayoutMismatchError,
    PrefillFailedError,
    WorkerUnavailableError,
)
from ._config import WorkerConfig
from ._layout import KVLayout
from ._protocol import HandoffStats

_LAZY = {
    "PagedKVPool": "._cache",
    "PagedKVCache": "._cache",
    "PagedLayer": "._cache",
    "DecodeWorker": "._decode",
    "PrefillWorker": "._prefill",
    "DisaggregatedCluster": "._cluster",
    "DisaggResult": "._cluster",
    "KVClient": "._cluster",
}

__all__ = [
    # memory
    "BlockAllocator",
    "BlockTable",
    "KVLayout",
    "PagedKVCache",
    "PagedKVPool",
    "PagedLayer",
    # disaggregated prefill / decode
    "DecodeWorker",
    "DisaggResult",
    "DisaggregatedCluster",
    "HandoffStats",
    "KVClient",
    "PrefillWorker",
    "WorkerConfig",
    # errors
    "BlockStateError",
    "KVCacheFullError",
    "KVError",
    "LayoutMismatchError",
    "PrefillFailedError",
    "WorkerUnavailableError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensorfabric.kv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
