"""Expert-parallel MoE dispatch and combine over the engine.

>>> from tensorfabric.moe import ExpertParallel, FileExchange   # doctest: +SKIP

See ``docs/moe.md``. Numpy and CPU torch tensors (float32, float16, bfloat16) are accepted;
torch is imported only if the caller passes torch tensors.
"""

from __future__ import annotations

from ._exchange import EngineExchange, Exchange, FileExchange
from ._parallel import DispatchResult, ExpertParallel

__all__ = [
    "ExpertParallel",
    "DispatchResult",
    "Exchange",
    "FileExchange",
    "EngineExchange",
]
