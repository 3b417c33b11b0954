"""The byte layout of a paged KV region (numpy only).

One region per worker holds every layer's blocks::

    region[layer][block][kv][slot][head][dim]      kv: 0 = keys, 1 = values

    offset(layer, block, kv, slot, head, dim) =
        (((((layer * num_blocks + block) * 2 + kv) * block_size + slot) * num_kv_heads + head)
         * head_dim + dim) * itemsize

A *page* is one block of one layer, keys then values: ``page_bytes = 2 * block_size *
num_kv_heads * head_dim * itemsize`` contiguous bytes at ``layer * layer_bytes + block *
page_bytes``. A request's block table (a list of block ids) is shared by all layers, so moving
layer ``l`` of a request is one ``write_pages`` call with ``page_size=page_bytes``,
``src_offset=l * src.layer_bytes``, ``dst_offset=l * dst.layer_bytes`` and the two block tables
as page lists. Token ``p`` of a request lives in block ``table[p // block_size]`` at slot
``p % block_size``. This is vLLM's per-layer ``[num_blocks, 2, block_size, heads, head_dim]``
("NHD") block shape, stacked over layers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._errors import LayoutMismatchError

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class KVLayout:
    """Shape of a paged KV region. ``dtype`` is a torch dtype name (``"float32"``...)."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"KVLayout.{name} must be at least 1")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}: use one of {sorted(_ITEMSIZE)}")

    @classmethod
    def for_model(cls, loaded: Any, *, num_blocks: int, block_size: int = 32) -> KVLayout:
        """The layout for a :class:`tensorfabric.models.LoadedModel`."""
        return cls(
            num_layers=loaded.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=loaded.num_kv_heads,
            head_dim=loaded.head_dim,
            dtype=str(loaded.dtype).removeprefix("torch."),
        )

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's keys (or values) in one layer."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes of one block of one layer (keys and values): the ``write_pages`` page size."""
        return 2 * self.block_size * self.token_bytes

    @property
    def layer_bytes(self) -> int:
        return self.num_blocks * self.page_bytes

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim
        )

    def page_offset(self, layer: int, block: int) -> int:
        return layer * self.layer_bytes + block * self.page_bytes

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes a request of ``num_tokens`` moves (whole blocks, all layers)."""
        return self.blocks_for(num_tokens) * self.page_bytes * self.num_layers

    def check_compatible(self, other: KVLayout) -> None:
        """Raise :class:`LayoutMismatchError` unless pages of ``other`` mean the same bytes."""
        mine = (self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)
        theirs = (other.num_layers, other.block_size, other.num_kv_heads, other.head_dim,
                  other.dtype)
        if mine != theirs:
            raise LayoutMismatchError(
                f"KV layouts differ (layers, block_size, kv_heads, head_dim, dtype): {mine} vs "
                f"{theirs}. Run the same model with the same --block-size and dtype on both workers."
            )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KVLayout:
        return cls(**json.loads(data))

    def empty(self) -> np.ndarray:
        """A zeroed, page-aligned uint8 buffer of ``nbytes`` (when no engine allocates one)."""
        return np.zeros(self.nbytes, dtype=np.uint8)
