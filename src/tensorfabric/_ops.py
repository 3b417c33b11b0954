"""Internal units of work: a logical op is cut into wire ops (one per destination, each
counting one immediate there), and each wire op into chunks (one frame each)."""

from __future__ import annotations

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
        self._lock = threading.Lock()

    @property
    def dead(self) -> bool:
        return self.transfer.done()

    def chunk_replied(self, status: int, text: str, region: int | None = None) -> None:
        if status != w.Status.OK:
            self.transfer._fail(status_error(status, text, self.peer, region))
            return
        with self._lock:  # chunks of one op may be acknowledged on several links at once
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            if self.on_done is not None:
                self.on_done(self)
            self.transfer._part_done()


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

    @property
    def key(self) -> tuple[int, int]:
        return (self.wop.op_id, self.idx)


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
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, n))
    return src_off[starts], dst_off[starts], counts.astype(np.uint64) * np.uint64(length)


def write_chunks(wop: WireOp, op: int, region: int, key: bytes, imm: int | None,
                 src: memoryview, src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
                 chunk_bytes: int = DEFAULT_CHUNK) -> list[Chunk]:
    """Cut segments ``src[src_off:+len] -> dst_off`` into frames of at most ``chunk_bytes``."""
    pieces: list[list[tuple[int, int, int]]] = []  # per chunk: (src_off, dst_off, len)
    cur: list[tuple[int, int, int]] = []
    cur_bytes = 0
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist()):
        while n > 0:
            take = min(n, chunk_bytes - cur_bytes)
            cur.append((s, d, take))
            cur_bytes += take
            s += take
            d += take
            n -= take
            if cur_bytes >= chunk_bytes or len(cur) >= MAX_SEGS_PER_CHUNK:
                pieces.append(cur)
                cur, cur_bytes = [], 0
    if cur or not pieces:
        pieces.append(cur)
    flags = w.FLAG_IMM if imm is not None else 0
    nchunks = len(pieces)
    chunks = []
    for i, segs in enumerate(pieces):
        table = np.array([(d, n) for _, d, n in segs], dtype=w.SEG_DTYPE).tobytes()
        ext = key + table
        nbytes = sum(n for _, _, n in segs)
        head = w.pack_header(op, flags, len(ext), wop.op_id, region, nbytes, imm or 0, i, nchunks)
        payload = [src[s:s + n] for s, _, n in segs]
        chunks.append(Chunk(wop, i, head + ext, payload, nbytes, region=region))
    wop.remaining = nchunks
    return chunks


def read_chunks(wop: WireOp, region: int, key: bytes, src_off: int, dst: memoryview,
                chunk_bytes: int = DEFAULT_CHUNK) -> list[Chunk]:
    n = dst.nbytes
    count = max(1, -(-n // chunk_bytes))
    chunks = []
    for i in range(count):
        a, b = i * chunk_bytes, min(n, (i + 1) * chunk_bytes)
        ext = key + np.array([(src_off + a, b - a)], dtype=w.SEG_DTYPE).tobytes()
        head = w.pack_header(w.Op.READ_REQ, 0, len(ext), wop.op_id, region, 0, 0, i, count)
        chunks.append(Chunk(wop, i, head + ext, [], b - a, dst=dst[a:b], region=region))
    wop.remaining = count
    return chunks


def simple_chunk(wop: WireOp, op: int, *, region: int = 0, imm: int = 0, flags: int = 0,
                 ext: bytes = b"", payload: memoryview | bytes | None = None) -> Chunk:
    data = [memoryview(payload)] if payload is not None and len(payload) else []
    n = len(payload) if payload is not None else 0
    head = w.pack_header(op, flags, len(ext), wop.op_id, region, n, imm, 0, 1)
    wop.remaining = 1
    return Chunk(wop, 0, head + ext, data, n, region=region)
