"""The paged KV pool (one buffer per worker) and a transformers ``Cache`` that lives in it.

:class:`PagedKVCache` is a ``transformers.Cache`` whose layers store keys and values in the
pool's blocks (see :mod:`._layout` for the bytes), so any transformers decoder model runs on
it unchanged: pass it as ``past_key_values``. Each layer's ``update`` scatters the new tokens
into the request's blocks and returns the whole sequence gathered back in the layout the model
expects (``[batch=1, kv_heads, seq, head_dim]``, contiguous), bit-identical to what
``DynamicCache`` returns, so greedy output matches a ``DynamicCache`` run token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import torch
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "tensorfabric.kv's paged cache needs torch and transformers: "
        "pip install 'tensorfabric[llm]'"
    ) from exc

from ._allocator import BlockAllocator, BlockTable
from ._errors import KVError
from ._layout import KVLayout

#: Called after a layer stored tokens ``[start, end)``: ``on_layer(layer, start, end)``.
LayerCallback = Callable[[int, int, int], None]


class PagedKVPool:
    """A worker's KV memory: ``layout.nbytes`` bytes viewed as ``kv[layer, block, kv, slot,
    head, dim]``, plus the :class:`BlockAllocator` for its blocks.

    ``buffer`` is any writable buffer of ``layout.nbytes`` bytes, typically the array of an
    engine region (``engine.alloc(layout.nbytes).array``) so peers can write pages into it;
    by default a private numpy buffer is allocated.
    """

    def __init__(self, layout: KVLayout, buffer: Any = None) -> None:
        self.layout = layout
        if buffer is None:
            buffer = layout.empty()
        raw = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) else (
            buffer.reshape(-1).view(np.uint8)
        )
        if raw.nbytes != layout.nbytes:
            raise ValueError(f"KV buffer has {raw.nbytes} bytes, the layout needs {layout.nbytes}")
        if not raw.flags.writeable:
            raise ValueError("the KV buffer must be writable")
        self.buffer = raw
        dtype = getattr(torch, layout.dtype)
        self.kv = torch.from_numpy(raw).view(dtype).view(layout.shape)
        self.allocator = BlockAllocator(layout.num_blocks)

    def new_table(self, num_tokens: int = 0) -> BlockTable:
        """A block table with room for ``num_tokens`` tokens (allocated now, all or nothing)."""
        table = BlockTable(self.allocator, self.layout.block_size)
        table.reserve(num_tokens)
        return table

    def layer_rows(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` as rows of ``[kv_heads, head_dim]``: row ``(block*2 + kv)*block_size
        + slot``."""
        lay = self.layout
        return self.kv[layer].view(lay.num_blocks * 2 * lay.block_size, lay.num_kv_heads,
                                   lay.head_dim)

    def rows(self, table: BlockTable, start: int, end: int) -> torch.Tensor:
        """Key row indices of tokens ``[start, end)`` (add ``block_size`` for values)."""
        bs = self.layout.block_size
        pos = torch.arange(start, end)
        blocks = torch.tensor(table.block_ids, dtype=torch.long)[pos // bs]
        return blocks * (2 * bs) + pos % bs

    def read(self, table: BlockTable, layer: int, num_tokens: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a request's first ``num_tokens`` tokens, ``[heads, seq, dim]``."""
        n = table.num_tokens if num_tokens is None else num_tokens
        idx = self.rows(table, 0, n)
        data = self.layer_rows(layer)
        bs = self.layout.block_size
        return (data.index_select(0, idx).transpose(0, 1),
                data.index_select(0, idx + bs).transpose(0, 1))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block (every layer) to another: copy-on-write for shared blocks."""
        self.kv[:, dst].copy_(self.kv[:, src])


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of a :class:`PagedKVCache`."""

    is_sliding = False
    is_croppable = False

    def __init__(self, cache: PagedKVCache, layer: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer = layer
        self.length = cache.table.num_tokens
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cache, pool = self.cache, self.cache.pool
        if key_states.shape[0] != 1:
            raise KVError("PagedKVCache holds one sequence: run requests with batch size 1")
        start, end = self.length, self.length + key_states.shape[-2]
        cache.prepare(end)
        all_rows = cache.rows(end)
        rows = all_rows[start:end]
        data = pool.layer_rows(self.layer)
        bs = pool.layout.block_size
        data.index_copy_(0, rows, key_states[0].transpose(0, 1).to(data.dtype))
        data.index_copy_(0, rows + bs, value_states[0].transpose(0, 1).to(data.dtype))
        self.length = end
        if self.layer == len(cache.layers) - 1:
            cache.table.num_tokens = end
        if cache.on_layer is not None:
            cache.on_layer(self.layer, start, end)
        if start == 0:
            return key_states.contiguous(), value_states.contiguous()
        keys = data.index_select(0, all_rows).transpose(0, 1).unsqueeze(0).contiguous()
        values = data.index_select(0, all_rows + bs).transpose(0, 1).unsqueeze(0).contiguous()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0


class PagedKVCache(Cache):
    """A ``transformers.Cache`` for one request, stored in a :class:`PagedKVPool`.

    ``table`` holds the request's blocks (a new empty one by default); blocks are allocated as
    tokens arrive and copied before writing if shared (copy-on-write). A table that already
    holds ``table.num_tokens`` tokens (say, written by a prefill worker) continues from there.
    ``on_layer(layer, start, end)`` runs right after a layer stored new tokens: the hook a
    prefill worker uses to ship each layer while later layers compute.
    """

    def __init__(self, pool: PagedKVPool, table: BlockTable | None = None, *,
                 on_layer: LayerCallback | None = None) -> None:
        self.pool = pool
        self.table = table if table is not None else pool.new_table()
        self.on_layer = on_layer
        self._prepared = self.table.num_tokens
        self._rows: torch.Tensor | None = None
        super().__init__(layers=[PagedLayer(self, i) for i in range(pool.layout.num_layers)])

    def prepare(self, end: int) -> None:
        """Blocks for tokens up to ``end`` exist and the ones to be written are private."""
        if end <= self._prepared:
            return
        table, alloc, bs = self.table, self.pool.allocator, self.pool.layout.block_size
        table.reserve(end)
        for i in range(self._prepared // bs, -(-end // bs)):
            old = table.block_ids[i]
            if alloc.refcount(old) > 1:
                (new,) = alloc.allocate(1)
                self.pool.copy_block(old, new)
                alloc.free([old])
                table.block_ids[i] = new
        self._prepared = end
        self._rows = None

    def rows(self, end: int) -> torch.Tensor:
        """Key row indices of tokens ``[0, end)``, shared by every layer of a step."""
        if self._rows is None or len(self._rows) != end:
            self._rows = self.pool.rows(self.table, 0, end)
        return self._rows

    def release(self) -> None:
        """Give the request's blocks back to the pool (idempotent)."""
        self.table.release()
