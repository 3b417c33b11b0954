"""Block allocator with reference counts, and per-request block tables (numpy only)."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from ._errors import BlockStateError, KVCacheFullError


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks-1``; thread-safe.

    ``allocate(n)`` is all-or-nothing and gives blocks with a reference count of 1;
    ``share(ids)`` adds a reference (prefix sharing, forks); ``free(ids)`` drops one and returns
    a block to the free list when its count reaches 0. Freeing a free block raises
    :class:`BlockStateError` instead of corrupting the free list.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        # Pop from the end: low ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def refcount(self, block: int) -> int:
        with self._lock:
            self._check(block)
            return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        with self._lock:
            if n > len(self._free):
                raise KVCacheFullError(
                    f"KV cache full: {n} blocks needed, {len(self._free)} of {self.num_blocks} "
                    "free. Retry when running requests finish, or start the worker with more "
                    "--kv-blocks.",
                    needed=n,
                    free=len(self._free),
                )
            ids = [self._free.pop() for _ in range(n)]
            for b in ids:
                self._refs[b] = 1
            return ids

    def share(self, ids: Iterable[int]) -> None:
        with self._lock:
            ids = list(ids)
            for b in ids:
                self._check(b)
                if self._refs[b] == 0:
                    raise BlockStateError(f"block {b} is free: it cannot be shared")
            for b in ids:
                self._refs[b] += 1

    def free(self, ids: Iterable[int]) -> None:
        with self._lock:
            ids = list(ids)
            for b in ids:
                self._check(b)
            counts: dict[int, int] = {}
            for b in ids:
                counts[b] = counts.get(b, 0) + 1
                if counts[b] > self._refs[b]:
                    raise BlockStateError(f"block {b} freed more often than it was referenced")
            for b in ids:
                self._refs[b] -= 1
                if self._refs[b] == 0:
                    self._free.append(b)

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise BlockStateError(f"block id {block} out of range 0..{self.num_blocks - 1}")


class BlockTable:
    """The blocks of one request, in token order, and how many tokens they hold.

    The table owns one reference to each of its blocks until :meth:`release`.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int,
                 block_ids: list[int] | None = None, num_tokens: int = 0) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.block_ids: list[int] = list(block_ids or [])
        self.num_tokens = num_tokens
        self.released = False

    @property
    def capacity(self) -> int:
        return len(self.block_ids) * self.block_size

    def reserve(self, num_tokens: int) -> list[int]:
        """Make room for ``num_tokens`` tokens in total; return the newly allocated ids."""
        if self.released:
            raise BlockStateError("block table already released")
        missing = -(-num_tokens // self.block_size) - len(self.block_ids)
        if missing <= 0:
            return []
        new = self.allocator.allocate(missing)
        self.block_ids.extend(new)
        return new

    def fork(self) -> BlockTable:
        """A second table sharing every block (copy-on-write happens in the cache)."""
        self.allocator.share(self.block_ids)
        return BlockTable(self.allocator, self.block_size, list(self.block_ids), self.num_tokens)

    def release(self) -> None:
        """Drop this table's references (idempotent)."""
        if not self.released:
            self.released = True
            ids, self.block_ids = self.block_ids, []
            self.allocator.free(ids)
