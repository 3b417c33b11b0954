"""Internal units of work: a logical op is cut into wire ops (one per destination, each
counting one immediate there), and each wire op into chunks (one frame each)."""

from __future__ import annotations

import struct
import threading
from typing import Any, Callable

import numpy as np

from . import _wire as w
from ._errors import AccessError, TensorFabricError, TransportError
from ._transfer import Transfer

DEFAULT_CHUNK = 4 << 20
MAX_SEGS_PER_CHUNK = 4096


class WireOp:
    """One piece of a transfer addressed to one peer. Done when every chunk is acknowledged."""

    __slots__ = ("op_id", "transfer", "remaining", "peer", "on_done", "_lock")

    def __init__(self, op_id: int, transfer: Transfer, peer: str,
                 on_done: Callable[[WireOp], Any] | None = None) -> None:
        self.op_id = op_id
        self.transfer = transfer
        self.remaining = 0
        self.peer = peer
        self.on_done = on_done
        #: set (by :func:`expect_chunks`) only when several chunks' acknowledgements may race
        self._lock: threading.Lock | None = None

    @property
    def dead(self) -> bool:
        return self.transfer.done()

    def chunk_replied(self, status: int, text: str, region: int | None = None) -> None:
        if status != w.Status.OK:
            self.transfer._fail(status_error(status, text, self.peer, region))
            return
        lock = self._lock
        if lock is None:  # one chunk: its one acknowledgement races with nothing
            left = self.remaining = self.remaining - 1
        else:
            with lock:  # chunks of one op may be acknowledged on several links at once
                left = self.remaining = self.remaining - 1
        if left == 0:
            if self.on_done is not None:
                self.on_done(self)
            self.transfer._part_done()


def expect_chunks(wop: WireOp, n: int) -> None:
    """Set how many chunks' acknowledgements finish ``wop`` (before any is sent)."""
    wop.remaining = n
    if n > 1:
        wop._lock = threading.Lock()


class Chunk:
    """One frame's worth of a wire op: what to send, and where a reply's payload goes."""

    __slots__ = ("wop", "idx", "head", "payload", "nbytes", "dst", "region")

    def __init__(self, wop: WireOp, idx: int, head: bytes, payload: list[memoryview],
                 nbytes: int, dst: memoryview | None = None, region: int = 0) -> None:
        self.wop = wop
        self.idx = idx
        self.head = head
        self.payload = payload
        self.nbytes = nbytes
        self.dst = dst
        self.region = region


def status_error(status: int, text: str, peer: str | None, region: int | None) -> TensorFabricError:
    if status in (w.Status.NO_REGION, w.Status.BAD_KEY, w.Status.OUT_OF_BOUNDS,
                  w.Status.NOT_PERMITTED):
        return AccessError(f"peer {peer} refused the access: {text}", peer=peer, region=region)
    return TransportError(f"peer {peer} failed the operation: {text}", peer=peer, region=region)


def coalesce(src_off: np.ndarray, dst_off: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge runs of pages that are adjacent in both source and destination."""
    n = len(src_off)
    if n == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty, empty
    brk = np.ones(n, dtype=bool)
    brk[1:] = (src_off[1:] != src_off[:-1] + length) | (dst_off[1:] != dst_off[:-1] + length)
    if brk.all():  # nothing to merge (pages in random order): skip the run bookkeeping
        return src_off, dst_off, np.full(n, length, dtype=np.uint64)
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, n))
    return src_off[starts], dst_off[starts], counts.astype(np.uint64) * np.uint64(length)


MIN_TAIL_CHUNK = 256 << 10


def frame_starts(total: int, chunk_bytes: int, links: int = 1) -> np.ndarray:
    """Byte offsets where frames start, and ``total`` at the end.

    One link: fixed ``chunk_bytes`` frames. Several links: guided sizes, each frame at most
    ``remaining / (2 * links)`` (and at least ``MIN_TAIL_CHUNK``), so the frames get smaller
    towards the end and the links finish together instead of one link carrying a whole
    last chunk alone (the tail costs at most a small frame's time, whatever the link speed).
    """
    if links <= 1 or total <= chunk_bytes:
        return np.append(np.arange(0, total, chunk_bytes, dtype=np.int64), total)
    # Full frames while the rest is large; then the guided tail (a few dozen frames at most).
    nfull = max(0, (total - 2 * links * chunk_bytes) // chunk_bytes)
    head = np.arange(0, (nfull + 1) * chunk_bytes, chunk_bytes, dtype=np.int64)
    tail: list[int] = []
    pos = int(head[-1])
    floor = min(MIN_TAIL_CHUNK, chunk_bytes)
    while pos < total:
        pos = min(total, pos + min(chunk_bytes, max(floor, (total - pos) // (2 * links))))
        tail.append(pos)
    return np.append(head, np.array(tail, dtype=np.int64))


def plan_pieces(src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
                chunk_bytes: int, links: int = 1,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut segments into pieces that fill frames (at most ``chunk_bytes`` bytes, sized by
    :func:`frame_starts`) of at most ``MAX_SEGS_PER_CHUNK`` segments, in order. Returns (src,
    dst, len, bounds) where frame ``k`` holds pieces ``bounds[k]:bounds[k + 1]``. Vectorized: a
    paged write of thousands of pages costs a few numpy calls, not a Python loop per page."""
    lengths = lengths.astype(np.int64, copy=False)
    keep = lengths > 0
    if not keep.all():
        src_off, dst_off, lengths = src_off[keep], dst_off[keep], lengths[keep]
    n = len(lengths)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, np.zeros(2, dtype=np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    if total <= chunk_bytes and n <= MAX_SEGS_PER_CHUNK:  # one frame, the segments as they are
        return (src_off.astype(np.int64), dst_off.astype(np.int64), lengths,
                np.array([0, n], dtype=np.int64))
    starts = ends - lengths
    # Cut points: every segment boundary and every frame boundary of the byte stream.
    fstarts = frame_starts(total, chunk_bytes, links)
    cuts = np.union1d(np.append(starts, total), fstarts)
    p_start, p_end = cuts[:-1], cuts[1:]
    seg = np.searchsorted(starts, p_start, side="right") - 1
    within = p_start - starts[seg]
    p_src = src_off[seg].astype(np.int64) + within
    p_dst = dst_off[seg].astype(np.int64) + within
    p_len = p_end - p_start
    # Frames by bytes, then split frames holding more than MAX_SEGS_PER_CHUNK pieces.
    frame = np.searchsorted(fstarts, p_start, side="right") - 1
    first = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1]])
    rank = np.arange(len(frame)) - np.repeat(first, np.diff(np.r_[first, len(frame)]))
    key = frame * (len(frame) + 1) + rank // MAX_SEGS_PER_CHUNK
    bounds = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return p_src, p_dst, p_len, np.r_[bounds, len(key)]


def write_chunks(wop: WireOp, op: int, region: int, key: bytes, imm: int | None,
                 src: memoryview, src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
                 chunk_bytes: int = DEFAULT_CHUNK, links: int = 1) -> list[Chunk]:
    """Cut segments ``src[src_off:+len] -> dst_off`` into frames of at most ``chunk_bytes``
    (smaller towards the end when ``links`` > 1, see :func:`frame_starts`)."""
    if len(lengths) == 1 and int(lengths[0]) <= chunk_bytes:
        return [one_frame(wop, op, region, key, imm, src, int(src_off[0]), int(dst_off[0]),
                           int(lengths[0]))]
    p_src, p_dst, p_len, bounds = plan_pieces(src_off, dst_off, lengths, chunk_bytes, links)
    opkey = w.OP_HEAD.pack(key, int((p_dst + p_len).max()) if len(p_len) else 0)
    table = np.empty(len(p_len), dtype=w.SEG_DTYPE)
    table["offset"] = p_dst
    table["length"] = p_len
    srcs, lens = p_src.tolist(), p_len.tolist()
    flags = w.FLAG_IMM if imm is not None else 0
    nchunks = len(bounds) - 1
    chunks = []
    for i in range(nchunks):
        a, b = int(bounds[i]), int(bounds[i + 1])
        ext = opkey + table[a:b].tobytes()
        nbytes = sum(lens[a:b])
        head = w.pack_header(op, flags, len(ext), wop.op_id, region, nbytes, imm or 0, i, nchunks)
        payload = [src[s:s + n] for s, n in zip(srcs[a:b], lens[a:b])]
        chunks.append(Chunk(wop, i, head + ext, payload, nbytes, region=region))
    expect_chunks(wop, nchunks)
    return chunks


_ONE_SEG = struct.Struct("<QQ")  # one SEG_DTYPE entry: offset, length


# header + OP_HEAD + one segment: a one-segment frame's head and ext in one pack
_ONE_FRAME = struct.Struct("<" + w.HEADER.format.lstrip("<") + w.OP_HEAD.format.lstrip("<")
                           + "QQ")
_ONE_FRAME_EXT = w.OP_HEAD.size + _ONE_SEG.size


def one_frame(wop: WireOp, op: int, region: int, key: bytes, imm: int | None,
               src: memoryview, s: int, d: int, n: int) -> Chunk:
    """The common small write: one segment in one frame, without numpy (latency path)."""
    wop.remaining = 1
    flags = w.FLAG_IMM if imm is not None else 0
    if n:
        head = _ONE_FRAME.pack(w.MAGIC, op, flags, _ONE_FRAME_EXT, wop.op_id, region, n,
                               imm or 0, 0, 1, key, d + n, d, n)
        return Chunk(wop, 0, head, [src[s:s + n]], n, region=region)
    ext = w.OP_HEAD.pack(key, d)
    head = w.pack_header(op, flags, len(ext), wop.op_id, region, 0, imm or 0, 0, 1)
    return Chunk(wop, 0, head + ext, [], 0, region=region)


def notice_frame(wop: WireOp, op: int, region: int, key: bytes, imm: int | None, d: int,
                 n: int) -> Chunk:
    """A write's notice without payload (``SHM_DONE``: the bytes are already in place), for
    one segment of ``n`` bytes at ``d``; built without numpy."""
    wop.remaining = 1
    head = _ONE_FRAME.pack(w.MAGIC, op, w.FLAG_IMM if imm is not None else 0, _ONE_FRAME_EXT,
                           wop.op_id, region, 0, imm or 0, 0, 1, key, d + n, d, n)
    return Chunk(wop, 0, head, [], 0, region=region)


def read_chunks(wop: WireOp, region: int, key: bytes, src_off: int, dst: memoryview,
                chunk_bytes: int = DEFAULT_CHUNK) -> list[Chunk]:
    n = dst.nbytes
    count = max(1, -(-n // chunk_bytes))
    chunks = []
    for i in range(count):
        a, b = i * chunk_bytes, min(n, (i + 1) * chunk_bytes)
        ext = w.OP_HEAD.pack(key, src_off + n) + _ONE_SEG.pack(src_off + a, b - a)
        head = w.pack_header(w.Op.READ_REQ, 0, len(ext), wop.op_id, region, 0, 0, i, count)
        chunks.append(Chunk(wop, i, head + ext, [], b - a, dst=dst[a:b], region=region))
    expect_chunks(wop, count)
    return chunks


def simple_chunk(wop: WireOp, op: int, *, region: int = 0, imm: int = 0, flags: int = 0,
                 ext: bytes = b"", payload: memoryview | bytes | None = None) -> Chunk:
    data = [memoryview(payload)] if payload is not None and len(payload) else []
    n = len(payload) if payload is not None else 0
    head = w.pack_header(op, flags, len(ext), wop.op_id, region, n, imm, 0, 1)
    wop.remaining = 1
    return Chunk(wop, 0, head + ext, data, n, region=region)
