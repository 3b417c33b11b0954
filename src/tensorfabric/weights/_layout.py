"""Layouts: how a set of named tensors is packed into one flat buffer, and how a replica's
tensors are built from the trainer's (reordering, fusion such as q/k/v, dtype change, shards).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorfabric.weights._dtypes import STORAGE, as_storage, can_convert, check_dtype, itemsize
from tensorfabric.weights._errors import LayoutError

ALIGN = 64  # every tensor starts on a 64-byte boundary (cache line; fine for vector loads)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        check_dtype(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def specs_of(tensors: Mapping[str, Any]) -> list[TensorSpec]:
    """TensorSpecs of a name -> array/tensor mapping, in its order."""
    out = []
    for name, value in tensors.items():
        arr, dtype = as_storage(value)
        out.append(TensorSpec(name, tuple(arr.shape), dtype))
    return out


@dataclass(frozen=True)
class Part:
    """A piece of a source tensor: ``source[start:stop]`` along ``dim`` (the whole tensor when
    ``dim`` is None). Shards of tensor-parallel replicas are parts."""

    source: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def shape(self, spec: TensorSpec) -> tuple[int, ...]:
        if self.dim is None:
            return spec.shape
        if not 0 <= self.dim < len(spec.shape):
            raise LayoutError(f"part of {self.source!r}: dim {self.dim} out of range for {spec.shape}")
        stop = spec.shape[self.dim] if self.stop is None else self.stop
        if not 0 <= self.start <= stop <= spec.shape[self.dim]:
            raise LayoutError(
                f"part of {self.source!r}: slice {self.start}:{stop} outside dim {self.dim} "
                f"of size {spec.shape[self.dim]}"
            )
        shape = list(spec.shape)
        shape[self.dim] = stop - self.start
        return tuple(shape)

    def view(self, arr: np.ndarray) -> np.ndarray:
        if self.dim is None:
            return arr
        index: list[slice] = [slice(None)] * arr.ndim
        index[self.dim] = slice(self.start, self.stop)
        return arr[tuple(index)]


@dataclass(frozen=True)
class DstTensor:
    """A replica tensor built by concatenating ``parts`` along ``axis`` and casting to ``dtype``."""

    name: str
    dtype: str
    parts: tuple[Part, ...]
    axis: int = 0

    @property
    def sources(self) -> list[str]:
        return [p.source for p in self.parts]


@dataclass
class Layout:
    """Tensors packed in order into one flat buffer, each at an ALIGN-byte boundary."""

    specs: list[TensorSpec]
    offsets: list[int] = field(default_factory=list)
    nbytes: int = 0

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise LayoutError("duplicate tensor names in a layout")
        offset = 0
        self.offsets = []
        for spec in self.specs:
            offset = -(-offset // ALIGN) * ALIGN
            self.offsets.append(offset)
            offset += spec.nbytes
        self.nbytes = offset
        self.index = {s.name: i for i, s in enumerate(self.specs)}

    def fingerprint(self) -> str:
        """A digest of names, shapes, dtypes and offsets: equal fingerprints, equal layouts."""
        blob = json.dumps([[s.name, list(s.shape), s.dtype, o] for s, o in zip(self.specs, self.offsets)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def views(self, buf: np.ndarray | memoryview) -> dict[str, np.ndarray]:
        """Typed views of every tensor inside ``buf`` (a flat uint8 buffer of >= nbytes)."""
        flat = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
        if flat.nbytes < self.nbytes:
            raise LayoutError(f"buffer of {flat.nbytes} bytes is smaller than the layout ({self.nbytes})")
        out = {}
        for spec, off in zip(self.specs, self.offsets):
            raw = flat[off : off + spec.nbytes]
            out[spec.name] = raw.view(STORAGE[spec.dtype]).reshape(spec.shape)
        return out

    def to_json(self) -> list[list[Any]]:
        return [[s.name, list(s.shape), s.dtype] for s in self.specs]

    @classmethod
    def from_json(cls, data: Iterable[Sequence[Any]]) -> Layout:
        return cls([TensorSpec(n, tuple(sh), dt) for n, sh, dt in data])


class LayoutMap:
    """How every replica tensor is computed from the trainer's tensors; validated up front.

    ``source`` lists the trainer's tensors, ``dest`` the replica's in the replica's order.
    """

    def __init__(self, source: Sequence[TensorSpec], dest: Sequence[DstTensor]) -> None:
        self.source = {s.name: s for s in source}
        self.dest = list(dest)
        specs = [self._check(d) for d in self.dest]
        self.layout = Layout(specs)

    def _check(self, d: DstTensor) -> TensorSpec:
        if not d.parts:
            raise LayoutError(f"replica tensor {d.name!r} has no parts")
        shapes = []
        for p in d.parts:
            if p.source not in self.source:
                raise LayoutError(f"replica tensor {d.name!r} needs {p.source!r}, which the trainer does not have")
            src = self.source[p.source]
            if not can_convert(src.dtype, d.dtype):
                raise LayoutError(f"{p.source!r}: cannot convert {src.dtype} to {d.dtype}")
            shapes.append(p.shape(src))
        first = shapes[0]
        if len(d.parts) > 1:
            if not all(len(s) == len(first) for s in shapes) or not 0 <= d.axis < len(first):
                raise LayoutError(f"replica tensor {d.name!r}: parts of different rank or bad axis {d.axis}")
            for s in shapes[1:]:
                if any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != d.axis):
                    raise LayoutError(
                        f"replica tensor {d.name!r}: parts {shapes} differ outside axis {d.axis}"
                    )
            shape = list(first)
            shape[d.axis] = sum(s[d.axis] for s in shapes)
            first = tuple(shape)
        return TensorSpec(d.name, first, d.dtype)

    @property
    def dst_specs(self) -> list[TensorSpec]:
        return self.layout.specs


def same_layout(source: Sequence[TensorSpec], *, dtype: str | None = None,
                order: Sequence[str] | None = None) -> list[DstTensor]:
    """Replica tensors equal to the trainer's, optionally cast to ``dtype`` and reordered."""
    by_name = {s.name: s for s in source}
    names = list(order) if order is not None else list(by_name)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise LayoutError(f"order names unknown tensors: {missing[:3]}")
    return [DstTensor(n, dtype or by_name[n].dtype, (Part(n),)) for n in names]


def fuse(dest: Sequence[DstTensor], name: str, sources: Sequence[str], *, axis: int = 0,
         dtype: str | None = None) -> list[DstTensor]:
    """Replace the replica tensors named ``sources`` by one tensor ``name`` (their concatenation
    along ``axis``, placed where the first one was). Used for q/k/v and gate/up projections."""
    by_name = {d.name: d for d in dest}
    if any(s not in by_name for s in sources) or not sources:
        raise LayoutError(f"fuse {name!r}: not all of {list(sources)} are replica tensors")
    parts = [p for s in sources for p in by_name[s].parts]
    first = next(d for d in dest if d.name in sources)
    out: list[DstTensor] = []
    for d in dest:
        if d is first:
            out.append(DstTensor(name, dtype or d.dtype, tuple(parts), axis))
        elif d.name not in sources:
            out.append(d)
    return out


def shard(dest: Sequence[DstTensor], source: Mapping[str, TensorSpec] | Sequence[TensorSpec], *,
          rank: int, world: int, dims: Mapping[str, int]) -> list[DstTensor]:
    """The ``rank``-th of ``world`` tensor-parallel shards: each tensor named in ``dims`` is cut
    along that dim (which must divide evenly); others are replicated whole."""
    specs = source if isinstance(source, Mapping) else {s.name: s for s in source}
    out = []
    for d in dest:
        dim = dims.get(d.name)
        if dim is None:
            out.append(d)
            continue
        if len(d.parts) != 1 or d.parts[0].dim is not None:
            raise LayoutError(f"shard {d.name!r}: shard before fusing, one whole part per tensor")
        size = specs[d.parts[0].source].shape[dim]
        if size % world:
            raise LayoutError(f"shard {d.name!r}: dim {dim} of size {size} does not split {world} ways")
        step = size // world
        out.append(DstTensor(d.name, d.dtype, (Part(d.parts[0].source, dim, rank * step, (rank + 1) * step),)))
    return out
