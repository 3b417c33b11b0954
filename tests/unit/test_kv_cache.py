"""Paged KV: layout bytes, block allocator, block tables, and the transformers Cache on it."""

from __future__ import annotations

import numpy as np
import pytest

from tensorfabric.kv import (
    BlockAllocator,
    BlockStateError,
    BlockTable,
    KVCacheFullError,
    KVLayout,
    LayoutMismatchError,
)


def test_allocator_is_all_or_nothing_and_counts_references() -> None:
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert sorted(a) == [0, 1, 2] and alloc.num_free == 1
    with pytest.raises(KVCacheFullError, match="2 blocks needed, 1 of 4 free") as info:
        alloc.allocate(2)
    assert info.value.needed == 2 and alloc.num_free == 1  # nothing taken
    alloc.share([a[0]])
    alloc.free([a[0]])
    assert alloc.refcount(a[0]) == 1 and alloc.num_free == 1
    alloc.free(a)
    assert alloc.num_free == 4
    with pytest.raises(BlockStateError, match="freed more often"):
        alloc.free([a[1]])
    with pytest.raises(BlockStateError, match="out of range"):
        alloc.free([9])
    with pytest.raises(BlockStateError, match="is free"):
        alloc.share([0])
    assert alloc.num_free == 4


def test_block_table_reserve_fork_release() -> None:
    alloc = BlockAllocator(8)
    table = BlockTable(alloc, block_size=4)
    assert table.reserve(5) == [0, 1] and table.reserve(8) == []
    assert table.reserve(9) == [2] and table.capacity == 12
    twin = table.fork()
    assert twin.block_ids == table.block_ids and alloc.refcount(0) == 2
    table.release()
    table.release()  # idempotent
    assert alloc.num_free == 5
    twin.release()
    assert alloc.num_free == 8
    with pytest.raises(KVCacheFullError):
        BlockTable(alloc, 4).reserve(33)
    assert alloc.num_free == 8


def test_layout_sizes_offsets_and_compatibility() -> None:
    lay = KVLayout(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8)
    assert lay.page_bytes == 2 * 4 * 2 * 8 * 4 and lay.nbytes == 3 * 5 * lay.page_bytes
    assert lay.page_offset(2, 3) == 2 * lay.layer_bytes + 3 * lay.page_bytes
    assert lay.blocks_for(9) == 3 and lay.kv_bytes(9) == 3 * 3 * lay.page_bytes
    assert KVLayout.from_bytes(lay.to_bytes()) == lay
    lay.check_compatible(KVLayout(3, 99, 4, 2, 8))  # block count may differ
    with pytest.raises(LayoutMismatchError, match="block_size"):
        lay.check_compatible(KVLayout(3, 5, 8, 2, 8))
    with pytest.raises(ValueError):
        KVLayout(3, 5, 4, 2, 8, dtype="int8")


torch = pytest.importorskip("torch")


def test_pool_bytes_follow_the_documented_layout() -> None:
    """A value written through the tensor view sits at the documented byte offset."""
    from tensorfabric.kv import PagedKVPool

    lay = KVLayout(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8)
    pool = PagedKVPool(lay)
    layer, block, kv, slot, head, dim = 2, 3, 1, 2, 1, 5
    pool.kv[layer, block, kv, slot, head, dim] = 7.5
    off = lay.page_offset(layer, block) + (((kv * 4 + slot) * 2 + head) * 8 + dim) * 4
    assert np.frombuffer(pool.buffer[off : off + 4].tobytes(), np.float32)[0] == 7.5
    assert np.count_nonzero(pool.buffer) == 2  # 7.5f has two non-zero bytes: nothing else moved


# --- with the real model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    from tensorfabric.models import load_model

    return load_model()


PROMPTS = [
    "What is the capital of France?",
    "Summarize the water cycle in two sentences. " * 6,  # crosses several 16-token blocks
]


@pytest.mark.model
def test_paged_cache_decodes_like_dynamic_cache(lm) -> None:  # type: ignore[no-untyped-def]
    from tensorfabric.kv import PagedKVCache, PagedKVPool
    from tensorfabric.models import generate

    pool = PagedKVPool(KVLayout.for_model(lm, num_blocks=64, block_size=16))
    for prompt in PROMPTS:
        ref = generate(lm, prompt, max_new_tokens=10)
        cache = PagedKVCache(pool)
        got = generate(lm, prompt, max_new_tokens=10, cache=cache)
        assert got.tokens == ref.tokens
        # Every generated token is fed back except the last one when max_new_tokens ended it.
        seen = got.prompt_tokens + len(got.tokens) - (0 if got.stopped else 1)
        assert cache.get_seq_length() == seen == cache.table.num_tokens
        assert len(cache.table.block_ids) == -(-seen // 16)
        assert pool.allocator.num_free == 64 - len(cache.table.block_ids)
        cache.release()
        assert pool.allocator.num_free == 64


@pytest.mark.model
def test_forked_tables_copy_on_write(lm) -> None:  # type: ignore[no-untyped-def]
    """Two continuations sharing a prompt's blocks each decode as if alone."""
    from transformers import DynamicCache

    from tensorfabric.kv import PagedKVCache, PagedKVPool
    from tensorfabric.models import chat_ids, decode, prefill

    ids = chat_ids(lm, "Name a color.")  # not a multiple of 16: the last block is shared
    assert len(ids) % 16
    pool = PagedKVPool(KVLayout.for_model(lm, num_blocks=16, block_size=16))
    first = PagedKVCache(pool)
    prefill(lm, ids, first)
    second = PagedKVCache(pool, first.table.fork())
    outs = []
    for cache, start in ((first, 11), (second, 22)):
        got, _ = decode(lm, start, cache, max_new_tokens=6, stop_token_ids=())
        ref_cache = DynamicCache(config=lm.config)
        prefill(lm, ids, ref_cache)
        want, _ = decode(lm, start, ref_cache, max_new_tokens=6, stop_token_ids=())
        assert got == want
        outs.append(got)
    assert outs[0] != outs[1]
    assert first.table.block_ids[-1] != second.table.block_ids[-1]  # the shared block was copied
    first.release()
    second.release()
    assert pool.allocator.num_free == 16
