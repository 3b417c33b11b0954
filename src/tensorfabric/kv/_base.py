"""What every KV worker process holds: the model, its paged layout, an engine, and the one
registered region that backs the block pool."""

from __future__ import annotations

import tensorfabric as tf

from ._cache import PagedKVPool
from ._config import WorkerConfig
from ._layout import KVLayout


class WorkerBase:
    def __init__(self, config: WorkerConfig) -> None:
        from tensorfabric.models import load_model

        self.config = config
        self.lm = load_model(config.model, dtype=config.dtype, disk_cache=config.disk_cache)
        self.layout = KVLayout.for_model(self.lm, num_blocks=config.num_blocks,
                                         block_size=config.block_size)
        self.engine = tf.Engine(config.secret, name=config.name or None, timeout=config.timeout)
        self.name = self.engine.name
        self.region = self.engine.alloc(self.layout.nbytes)
        self.pool = PagedKVPool(self.layout, self.region.array)
