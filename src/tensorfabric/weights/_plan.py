"""The transfer plan: computed once, replayed every step.

The replica's flat layout is cut into chunks (contiguous byte ranges of about ``chunk_bytes``,
large tensors split by rows). Preparing a chunk writes the converted replica bytes of exactly
that range into the publisher's staging buffer, so the conversion of chunk i+1 overlaps the
transfer of chunk i. Fan-out is a chain or tree: a replica forwards each chunk to its children
as soon as it lands, so the trainer's link carries the model once per root, not once per replica.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from tensorfabric.weights._dtypes import STORAGE, as_storage, convert_into
from tensorfabric.weights._errors import LayoutError
from tensorfabric.weights._layout import DstTensor, LayoutMap, TensorSpec

DEFAULT_CHUNK_BYTES = 8 << 20
#: an unconverted piece at least this large becomes its own chunk, written from trainer memory
DEFAULT_DIRECT_MIN_BYTES = 2 << 20


@dataclass(frozen=True)
class Piece:
    """Rows ``[row0, row1)`` of replica tensor ``tensor`` (flattened to rows of its dim 0)."""

    tensor: int
    row0: int
    row1: int
    offset: int  # byte offset of the piece in the replica layout
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int  # first byte in the replica layout
    nbytes: int  # contiguous bytes, including alignment padding between tensors
    pieces: tuple[Piece, ...]
    #: set when the chunk is exactly a contiguous byte range of one trainer tensor, unconverted:
    #: the publisher may then write it straight from the trainer's memory (no staging copy)
    source: str | None = None
    src_offset: int = 0  # byte offset of the chunk in that trainer tensor


def _rows(spec: TensorSpec) -> tuple[int, int]:
    """(rows, bytes per row) of a tensor seen as rows of its first dim (scalars: one row)."""
    if len(spec.shape) == 0:
        return 1, spec.nbytes
    rows = spec.shape[0]
    return rows, (spec.nbytes // rows if rows else 0)


class WeightPlan:
    """Which bytes of the replica layout come from which trainer tensors, cut into chunks.

    Build it once (``WeightPlan(source_specs, dest)``); ``prepare(i, tensors, staging)`` fills
    chunk ``i`` of ``staging`` from the trainer's current tensors, converting on the way.
    """

    def __init__(self, source: Sequence[TensorSpec], dest: Sequence[DstTensor], *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 direct_min_bytes: int | None = DEFAULT_DIRECT_MIN_BYTES) -> None:
        if chunk_bytes <= 0:
            raise LayoutError("chunk_bytes must be positive")
        self.map = LayoutMap(source, dest)
        self.layout = self.map.layout
        self.chunk_bytes = chunk_bytes
        self.direct_min_bytes = direct_min_bytes  # None: every chunk goes through staging
        self.chunks = self._cut()

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def source_nbytes(self) -> int:
        return sum(s.nbytes for s in self.map.source.values())

    def _pieces(self) -> list[Piece]:
        out = []
        for i, (spec, off) in enumerate(zip(self.layout.specs, self.layout.offsets)):
            rows, row_bytes = _rows(spec)
            if rows == 0 or row_bytes == 0:
                continue
            step = max(1, self.chunk_bytes // row_bytes)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                out.append(Piece(i, r0, r1, off + r0 * row_bytes, (r1 - r0) * row_bytes))
        return out

    def _direct(self, piece: Piece) -> tuple[str, int] | None:
        """(trainer tensor, byte offset) when ``piece`` is an unconverted contiguous range of one
        trainer tensor (a whole tensor or a dim-0 slice, same dtype), else None."""
        if self.direct_min_bytes is None or piece.nbytes < self.direct_min_bytes:
            return None
        dst = self.map.dest[piece.tensor]
        if len(dst.parts) != 1:
            return None
        part = dst.parts[0]
        src = self.map.source[part.source]
        if src.dtype != dst.dtype or part.dim not in (None, 0):
            return None
        rows, row_bytes = _rows(self.layout.specs[piece.tensor])
        first = part.start if part.dim == 0 else 0
        return part.source, (first + piece.row0) * row_bytes

    def _cut(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        group: list[Piece] = []
        for piece in self._pieces():
            direct = self._direct(piece)
            if group and (direct is not None
                          or piece.offset + piece.nbytes - group[0].offset > self.chunk_bytes):
                chunks.append(self._chunk(len(chunks), group))
                group = []
            if direct is not None:  # its own chunk, exactly the piece's bytes
                chunks.append(Chunk(len(chunks), piece.offset, piece.nbytes, (piece,), *direct))
                continue
            group.append(piece)
        if group:
            chunks.append(self._chunk(len(chunks), group))
        return chunks

    @staticmethod
    def _chunk(index: int, group: list[Piece]) -> Chunk:
        start = group[0].offset
        return Chunk(index, start, group[-1].offset + group[-1].nbytes - start, tuple(group))

    def check_sources(self, tensors: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, str]]:
        """Storage views of the trainer's tensors, checked against the plan's source specs."""
        out = {}
        for name, spec in self.map.source.items():
            if name not in tensors:
                raise LayoutError(f"the trainer's weights lack {name!r}, which the plan needs")
            arr, dtype = as_storage(tensors[name])
            if tuple(arr.shape) != spec.shape or dtype != spec.dtype:
                raise LayoutError(
                    f"{name!r} is {dtype}{list(arr.shape)} but the plan was built for "
                    f"{spec.dtype}{list(spec.shape)}: rebuild the plan after a layout change"
                )
            out[name] = (arr, dtype)
        return out

    def source_bytes(self, index: int, sources: Mapping[str, tuple[np.ndarray, str]]) -> np.ndarray | None:
        """Chunk ``index``'s bytes as a uint8 view of the trainer's tensor (no copy), or None
        when the chunk needs staging (converted, fused, or the tensor is not C-contiguous)."""
        c = self.chunks[index]
        if c.source is None:
            return None
        arr = sources[c.source][0]
        if not arr.flags.c_contiguous:
            return None
        flat = arr.reshape(-1).view(np.uint8)
        return flat[c.src_offset : c.src_offset + c.nbytes]

    def prepare(self, index: int, sources: Mapping[str, tuple[np.ndarray, str]],
                staging: np.ndarray) -> None:
        """Fill chunk ``index`` of ``staging`` (a flat uint8 buffer in the replica layout).

        ``sources`` comes from ``check_sources``.
        """
        for piece in self.chunks[index].pieces:
            self._fill(piece, sources, staging)

    def _fill(self, piece: Piece, sources: Mapping[str, tuple[np.ndarray, str]],
              staging: np.ndarray) -> None:
        dst = self.map.dest[piece.tensor]
        spec = self.layout.specs[piece.tensor]
        raw = staging[piece.offset : piece.offset + piece.nbytes].view(STORAGE[spec.dtype])
        rows = piece.row1 - piece.row0
        out = raw.reshape((rows, *spec.shape[1:]) if spec.shape else (1,))
        if len(dst.parts) == 1 or dst.axis != 0:
            along = 0
            for part in dst.parts:
                arr, src_dtype = sources[part.source]
                view = part.view(arr)
                view = view.reshape(1) if view.ndim == 0 else view[piece.row0 : piece.row1]
                if len(dst.parts) == 1:
                    convert_into(out, view, src_dtype, dst.dtype)
                    continue
                index: list[slice] = [slice(None)] * out.ndim
                index[dst.axis] = slice(along, along + view.shape[dst.axis])
                along += view.shape[dst.axis]
                convert_into(out[tuple(index)], view, src_dtype, dst.dtype)
            return
        base = 0  # concatenation along dim 0: rows map to consecutive parts
        for part in dst.parts:
            arr, src_dtype = sources[part.source]
            view = part.view(arr)
            n = view.shape[0]
            lo, hi = max(piece.row0, base), min(piece.row1, base + n)
            if lo < hi:
                convert_into(out[lo - piece.row0 : hi - piece.row0], view[lo - base : hi - base],
                             src_dtype, dst.dtype)
            base += n


_xxhash: Any
try:
    import xxhash as _xxhash
except ImportError:  # the ``weights`` extra is not installed
    _xxhash = None

_poly1305: Any
try:
    from cryptography.hazmat.primitives.poly1305 import Poly1305 as _poly1305
except ImportError:  # the ``integrity`` extra is not installed
    _poly1305 = None

CHECKSUMS = ("xxh3", "lanesum", "crc32", "poly1305")
#: checksums that need a key (``checksum(..., key=...)``): a relay without it cannot forge them
KEYED_CHECKSUMS = ("poly1305",)
#: ``xxh3`` where the ``xxhash`` package is installed (the ``weights`` extra), else ``lanesum``.
DEFAULT_CHECKSUM = "xxh3" if _xxhash is not None else "lanesum"
_BLOCK = 16 * 64 * 8  # lanesum block: 16 rows of 64 uint64 lanes (8 KiB)
#: lanesum row weights: distinct odd multipliers, so rows that trade places change the sums
_ROW_WEIGHTS = np.uint64(0x9E3779B97F4A7C15) * (2 * np.arange(16, dtype=np.uint64) + np.uint64(1))


def checksum_available(kind: str) -> str | None:
    """None if this process can compute checksum ``kind``, else why not."""
    if kind not in CHECKSUMS:
        return f"unknown checksum {kind!r}: use one of {CHECKSUMS}"
    if kind == "poly1305" and _poly1305 is None:
        return ("checksum 'poly1305' needs the cryptography package: pip install "
                "'tensorfabric[integrity]'")
    if kind == "xxh3" and _xxhash is None:
        return ("checksum 'xxh3' needs the xxhash package: pip install 'tensorfabric[weights]' "
                "(or publish with checksum='lanesum')")
    return None


def chunk_key(key: bytes, session: bytes, version: int, chunk: int) -> bytes:
    """The one-time Poly1305 key of one chunk of one version of one publisher session:
    BLAKE2b keyed with ``key`` (the shared secret's weights key) over (session, version,
    chunk). Never the same for two different messages, as Poly1305 requires: a restarted
    publisher has a new random ``session``."""
    if not key:
        raise LayoutError("a keyed checksum needs a non-empty key")
    msg = bytes(session) + struct.pack("<QQ", version & (2**64 - 1), chunk)
    return hashlib.blake2b(msg, key=key[:64], digest_size=32, person=b"tf-weights-mac").digest()


def weights_key(secret: str | bytes) -> bytes:
    """The key of weight checksums derived from an engine secret (never the secret itself)."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not raw:
        raise LayoutError("keyed weight checksums need a non-empty secret")
    return hashlib.blake2b(raw, digest_size=32, person=b"tf-weights-key").digest()


def checksum(buf: np.ndarray | memoryview | bytes, kind: str = DEFAULT_CHECKSUM, *,
             key: bytes | None = None) -> int:
    """A checksum of a buffer (an int of up to 64 bits).

    ``xxh3`` (default where ``xxhash`` is installed): the 64-bit XXH3 hash, as fast as memory
    can be read (27-30 GB/s on one core here, 2.7x ``lanesum``); it catches any change of the
    bytes, reordering included. ``crc32``: zlib CRC-32 (about 4-6 GB/s on one core).
    ``lanesum`` (no extra package): each 8 KiB block is summed as 16 rows of 64 uint64 lanes,
    each row times its own odd weight (mod 2**64), and the CRC-32 of those lane sums (in block
    order) plus the CRC-32 of the tail is the result. It catches any bit flip, stale or missing
    bytes, data landing in the wrong 8 KiB block and 512-byte rows swapped within a block.

    ``poly1305`` is keyed (``key``: a one-time key from ``chunk_key``): a 128-bit
    Poly1305 tag (OpenSSL, ~10 GB/s on one core here) that nobody without the secret can
    compute, so a relay that changes the data cannot recompute it. The others catch accidents
    only; against a relay they rely on the tcp links' frame MACs.
    """
    why = checksum_available(kind)
    if why is not None:
        raise LayoutError(why)
    if kind == "poly1305":
        if key is None or len(key) != 32:
            raise LayoutError("checksum 'poly1305' needs a 32-byte one-time key (chunk_key)")
        mac = _poly1305(key)
        mac.update(cast(Any, buf if not isinstance(buf, np.ndarray) else buf.reshape(-1)))
        return int.from_bytes(mac.finalize(), "little")
    if kind == "xxh3":
        return int(_xxhash.xxh3_64_intdigest(cast(Any, buf)))
    if kind == "crc32":
        return zlib.crc32(cast(Any, buf))
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1)
    body = arr.nbytes - arr.nbytes % _BLOCK
    crc = 0
    if body:
        rows = arr[:body].view(np.uint64).reshape(-1, 16, 64)
        sums = np.einsum("j,njk->nk", _ROW_WEIGHTS, rows)
        crc = zlib.crc32(cast(Any, sums), crc)
    return zlib.crc32(cast(Any, arr[body:]), crc)


def fanout(n: int, kind: str = "tree", *, degree: int = 2, roots: int = 1) -> list[int]:
    """Parent of each of ``n`` replicas (-1: the publisher writes to it directly).

    ``direct``: the publisher writes to all. ``chain``: replica i gets chunks from i-1.
    ``tree``: ``roots`` replicas fed by the publisher, each replica feeds up to ``degree``.
    """
    if kind == "direct":
        return [-1] * n
    if kind == "chain":
        return [-1 if i < roots else i - roots for i in range(n)]
    if kind == "tree":
        if degree < 1 or roots < 1:
            raise LayoutError("tree fan-out needs degree >= 1 and roots >= 1")
        return [-1 if i < roots else (i - roots) // degree for i in range(n)]
    raise LayoutError(f"unknown fan-out {kind!r}: use direct, chain or tree")


def depth(parents: Sequence[int]) -> int:
    """Number of hops on the longest publisher -> replica path."""
    best = 0
    for i in range(len(parents)):
        hops, j = 1, parents[i]
        while j >= 0:
            hops, j = hops + 1, parents[j]
        best = max(best, hops)
    return best


def n_chunks(nbytes: int, chunk_bytes: int) -> int:
    return max(1, math.ceil(nbytes / chunk_bytes))
