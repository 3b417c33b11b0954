"""vLLM's KV cache as tensorfabric sees it: one backing buffer, pages of one block of one layer.

On vLLM's CPU backend (0.32) every attention layer's cache is a ``[num_blocks, ...]`` view of
one int8 buffer (``vllm.v1.worker.utils.allocate_kv_cache``): layer ``l``'s block ``b`` is
``block_bytes`` contiguous bytes at ``layer_offset[l] + b * block_bytes``. A *page* is such a
block; page ``layer_offset[l] // block_bytes + b`` addresses it, so one ``write_pages`` moves a
request's blocks of every layer at once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from .._errors import ConfigError

log = logging.getLogger("tensorfabric.vllm")

#: smallest allocation the shared-memory context takes over (the KV buffer is GiBs)
_MIN_SHM_ALLOC = 1 << 20


class LayoutMismatchError(ConfigError):
    """The prefill and decode instances lay out their KV caches differently."""


@dataclass(frozen=True)
class KVLayout:
    """What a peer must agree on to copy our blocks byte for byte."""

    layers: tuple[str, ...]        # layer names, in page order
    layer_pages: tuple[int, ...]   # page index of each layer's block 0
    block_bytes: int               # bytes of one block of one layer
    block_shape: tuple[int, ...]   # a block's tensor shape (vLLM's layout inside a block)
    dtype: str
    block_size: int                # tokens per block
    num_blocks: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KVLayout:
        try:
            return cls(layers=tuple(d["layers"]), layer_pages=tuple(int(x) for x in d["layer_pages"]),
                       block_bytes=int(d["block_bytes"]),
                       block_shape=tuple(int(x) for x in d["block_shape"]), dtype=str(d["dtype"]),
                       block_size=int(d["block_size"]), num_blocks=int(d["num_blocks"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed KV layout from a peer: {exc!r}") from None

    def check_compatible(self, other: KVLayout, *, ours: str = "decode",
                         theirs: str = "prefill") -> None:
        """Raise LayoutMismatchError naming every difference that stops a byte copy."""
        diffs = []
        for name in ("block_size", "dtype", "block_shape", "block_bytes"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                diffs.append(f"{name}: {ours} {a}, {theirs} {b}")
        if self.layers != other.layers:
            diffs.append(f"layers: {ours} has {len(self.layers)}, {theirs} {len(other.layers)} "
                         "(or they are named differently: a different model?)")
        if diffs:
            raise LayoutMismatchError(
                "KV cache layouts differ between the " + theirs + " and " + ours + " instances ("
                + "; ".join(diffs) + "). tensorfabric copies KV blocks byte for byte and does "
                "not convert block sizes, dtypes or head layouts: start both with the same "
                "model, --dtype, --block-size and tensor-parallel size.")

    def pages(self, blocks: list[int]) -> list[int]:
        """Page indices of ``blocks`` in every layer (layer-major)."""
        return [base + b for base in self.layer_pages for b in blocks]


def layout_of(kv_caches: dict[str, Any], base_ptr: int, block_size: int) -> KVLayout:
    """The layout of vLLM's per-layer KV tensors, relative to the buffer at ``base_ptr``."""
    if not kv_caches:
        raise ConfigError("vLLM registered no KV cache tensors")
    names = list(kv_caches)
    first = kv_caches[names[0]]
    itemsize = first.element_size()
    block_bytes = first.stride(0) * itemsize
    shape = tuple(first.shape[1:])
    pages = []
    for name in names:
        t = kv_caches[name]
        if (t.device.type != "cpu" or tuple(t.shape[1:]) != shape or t.dtype != first.dtype
                or not t.is_contiguous()):
            raise ConfigError(
                f"KV layer {name} is {tuple(t.shape)} {t.dtype} on {t.device}, contiguous="
                f"{t.is_contiguous()}; the tensorfabric connector needs contiguous CPU layers of "
                f"one shape (vLLM's CPU backend)")
        offset = t.data_ptr() - base_ptr
        if offset < 0 or offset % block_bytes:
            raise ConfigError(f"KV layer {name} starts {offset} bytes into the KV buffer, not "
                              f"on a {block_bytes}-byte block boundary")
        pages.append(offset // block_bytes)
    return KVLayout(layers=tuple(names), layer_pages=tuple(pages), block_bytes=block_bytes,
                    block_shape=shape, dtype=str(first.dtype).removeprefix("torch."),
                    block_size=block_size, num_blocks=int(first.shape[0]))


@contextlib.contextmanager
def shm_allocation(alloc: Callable[[int], Any]) -> Iterator[None]:
    """While active, vLLM's KV buffer (``torch.zeros(n, dtype=torch.int8)`` on the CPU) is
    allocated by ``alloc(n)`` (which returns a CPU tensor over the engine's shared memory)
    instead. vLLM runs its KV allocation inside the context a connector's
    ``get_mem_pool_context`` returns; every other allocation passes through untouched."""
    import torch

    real = torch.zeros

    def zeros(*size: Any, **kw: Any) -> Any:
        dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        device = kw.get("device")
        if (kw.get("dtype") is torch.int8 and len(dims) == 1 and isinstance(dims[0], int)
                and dims[0] >= _MIN_SHM_ALLOC and set(kw) <= {"dtype", "device"}
                and (device is None or torch.device(device).type == "cpu")):
            return alloc(dims[0])
        return real(*size, **kw)

    torch.zeros = zeros
    try:
        yield
    finally:
        torch.zeros = real
