"""Shared memory: same-host peers copy straight into each other's regions.

Regions made with :meth:`Engine.alloc` live in anonymous shared-memory files (memfd). A peer on
the same host asks the owner, over the authenticated tcp link, to open a region with its key
(``SHM_OPEN``); only when the owner has checked key and permission does the peer map the file
(through ``/proc/<owner pid>/fd/<fd>``) and keep the mapping for later ops. A write is then one
copy into the mapping (large ones split across a few copy threads, pages copied in batches: see
``_copy``) followed by a small ``SHM_DONE`` frame that the owner checks again and
that carries the immediate; the owner's acknowledgement completes the transfer. Reads copy out
of a read-only mapping and need no round trip.
"""

from __future__ import annotations

import collections
import functools
import logging
import mmap
import os
import queue
import threading
from typing import Any, Callable

import numpy as np

from .. import _wire as w
from .._address import EngineAddress
from .._errors import AccessError, BrokenError, TensorFabricError
from .._ops import WireOp, simple_chunk
from .._region import Access, RegionDescriptor
from .._transfer import Transfer
from . import _copy
from ._base import Transport
from ._tcp import TcpTransport

log = logging.getLogger("tensorfabric.shm")

_INLINE_COPY = 256 << 10  # copies up to this size run in the caller's thread
_MAX_MAPPINGS = 4096


def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class ShmTransport(Transport):
    """Copies into a same-host peer's shared-memory regions. Control goes over ``tcp``."""

    name = "shm"
    one_sided = True
    same_host_only = True

    def __init__(self, tcp: TcpTransport, *, timeout: float = 10.0) -> None:
        self.tcp = tcp
        self.timeout = timeout
        self._host = host_id()
        self._same: dict[bytes, bool] = {}
        self._maps: collections.OrderedDict[tuple[bytes, int, int], tuple[mmap.mmap, np.ndarray]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._closed = False
        #: how many threads one large copy may use at once
        self.copy_threads = _copy.COPY_THREADS
        self._workers = [threading.Thread(target=self._run, name=f"tf-shm-copy-{i}", daemon=True)
                         for i in range(_copy.COPY_THREADS)]
        for t in self._workers:
            t.start()

    # -- same host --------------------------------------------------------------------------

    def same_host(self, peer: EngineAddress) -> bool:
        known = self._same.get(peer.engine_id)
        if known is None:
            known = self._probe(peer)
            self._same[peer.engine_id] = known
        return known

    def _probe(self, peer: EngineAddress) -> bool:
        if not self._host or peer.host_id != self._host or peer.probe_fd < 0:
            return False
        try:
            fd = os.open(f"/proc/{peer.pid}/fd/{peer.probe_fd}", os.O_RDONLY)
        except OSError:
            return False  # other pid namespace or no permission: not reachable through memory
        try:
            return os.pread(fd, len(peer.probe_nonce), 0) == peer.probe_nonce
        finally:
            os.close(fd)

    def reaches(self, peer: EngineAddress, desc: RegionDescriptor | None) -> bool:
        return desc is not None and desc.shm and self.same_host(peer)

    # -- mappings ---------------------------------------------------------------------------

    def _mapping(self, peer: EngineAddress, desc: RegionDescriptor, need: Access) -> np.ndarray:
        key = (peer.engine_id, desc.region_id, int(need))
        with self._lock:
            hit = self._maps.get(key)
            if hit is not None:
                self._maps.move_to_end(key)
                return hit[1]
        # the owner checks our key and permission before we may map anything
        check = Transfer("shm-open", peer=str(peer))
        wop = WireOp(next(self.tcp.op_ids), check, str(peer))
        self.tcp.submit(peer, [simple_chunk(wop, w.Op.SHM_OPEN, region=desc.region_id,
                                            imm=int(need), ext=desc.key)])
        check.wait(self.timeout)
        flags = os.O_RDWR if need & Access.REMOTE_WRITE else os.O_RDONLY
        try:
            fd = os.open(f"/proc/{desc.shm_pid}/fd/{desc.shm_fd}", flags)
        except OSError as exc:
            raise BrokenError(f"cannot open peer {peer}'s shared memory: {exc}", peer=str(peer)) from exc
        try:
            size = os.fstat(fd).st_size
            if size < desc.nbytes:
                raise AccessError(f"peer {peer}'s region {desc.region_id} is smaller than its "
                                  "descriptor says", peer=str(peer), region=desc.region_id)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if need & Access.REMOTE_WRITE else 0)
            mm = mmap.mmap(fd, max(desc.nbytes, 1), mmap.MAP_SHARED | mmap.MAP_POPULATE, prot)
        finally:
            os.close(fd)
        arr = np.frombuffer(mm, dtype=np.uint8, count=desc.nbytes)
        with self._lock:
            self._maps[key] = (mm, arr)
            while len(self._maps) > _MAX_MAPPINGS:
                self._maps.popitem(last=False)
        return arr

    # -- ops --------------------------------------------------------------------------------

    def write(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src: memoryview,
              src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
              imm: int | None) -> None:
        dst = self._mapping(peer, desc, Access.REMOTE_WRITE)
        srcarr = np.frombuffer(src, dtype=np.uint8)

        def notify() -> None:
            ext = desc.key + w.segments_table(dst_off, lengths)
            chunk = simple_chunk(wop, w.Op.SHM_DONE, region=desc.region_id, imm=imm or 0,
                                 flags=w.FLAG_IMM if imm is not None else 0, ext=ext)
            self.tcp.submit(peer, [chunk])

        self._copy(wop, dst, srcarr, src_off, dst_off, lengths, notify)

    def read(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src_offset: int,
             dst: memoryview) -> None:
        srcmap = self._mapping(peer, desc, Access.REMOTE_READ)

        def done() -> None:
            wop.remaining = 1
            wop.chunk_replied(w.Status.OK, "")

        self._copy(wop, np.frombuffer(dst, dtype=np.uint8), srcmap,
                   np.array([src_offset], dtype=np.int64), np.zeros(1, dtype=np.int64),
                   np.array([dst.nbytes], dtype=np.int64), done)

    def _copy(self, wop: WireOp, dst: np.ndarray, src: np.ndarray, src_off: np.ndarray,
              dst_off: np.ndarray, lengths: np.ndarray, then: Callable[[], None]) -> None:
        """Copy the segments (inline when small, else on up to COPY_THREADS workers at once),
        then call ``then`` once, from whichever thread finished last."""
        src_off, dst_off, lengths, runs = _copy.by_source(src_off, dst_off, lengths)
        parts = _copy.split(src_off, dst_off, lengths,
                            _copy.plan_parts(lengths, self.copy_threads, runs=runs))
        left = [len(parts)]
        lock = threading.Lock()
        failed: list[BaseException] = []

        def run(part: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            try:
                if not wop.dead and not failed:
                    _copy.copy_segments(dst, src, *part, presorted=True)
            except Exception as exc:  # noqa: BLE001 - reported on the transfer below
                failed.append(exc)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if not last or wop.dead:
                return
            try:
                if failed:
                    raise failed[0]
                then()
            except TensorFabricError as exc:
                wop.transfer._fail(exc)
            except Exception as exc:  # keep the worker alive; report on the transfer
                wop.transfer._fail(BrokenError(f"shared-memory copy failed: {exc}"))

        total = int(lengths.sum()) if len(lengths) else 0
        if total <= _INLINE_COPY:
            run(parts[0])
        else:
            for part in parts:
                self._work.put(functools.partial(run, part))

    def _run(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            job()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._work.put(None)
        for t in self._workers:
            t.join(timeout=5)
        with self._lock:
            maps = list(self._maps.values())
            self._maps.clear()
        for mm, _ in maps:
            try:
                mm.close()
            except BufferError:
                pass  # a numpy view is still alive; the mapping goes with it

