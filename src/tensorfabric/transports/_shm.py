"""Shared memory: same-host peers copy straight into each other's regions.

Regions made with :meth:`Engine.alloc` live in anonymous shared-memory files (memfd). A peer on
the same host asks the owner, over the authenticated tcp link, to open a region with its key
(``SHM_OPEN``); only when the owner has checked key and permission does it hand the region's
file over itself, opened with exactly the access granted (see ``_shm_grant``), and the peer
keeps the mapping until the owner revokes it (unregister) or the peer is forgotten. A write is
then one copy into the mapping (large ones split across a few copy threads, pages copied in batches: see
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
import stat
import threading
import time
from typing import Any, Callable

import numpy as np

from .. import _wire as w
from .._address import EngineAddress
from .._errors import AccessError, BrokenError, TensorFabricError
from .._ops import WireOp, notice_frame, simple_chunk
from .._region import Access, RegionDescriptor
from .._transfer import Transfer
from . import _copy
from ._base import Transport
from ._shm_grant import GRANT, GrantFn, ShmGrants, Unanswered, redeem
from ._tcp import TcpTransport

log = logging.getLogger("tensorfabric.shm")

_SMALL_COPY = 64 << 10  # one-segment copies up to this size hold the GIL
_INLINE_COPY = 4 << 20  # copies up to this size run in the caller's thread (a hand-off costs more)
_MAX_MAPPINGS = 4096
_REVOKE_WAIT = 5.0  # a revocation waits this long for copies into the mapping to finish


class _NoSharedMemory(Exception):
    """Internal: the owner's memory cannot be mapped from here (use tcp instead)."""


class _Mapping:
    """A peer region mapped here, and the copies using it (a revocation waits for them)."""

    __slots__ = ("mm", "arr", "users", "revoked")

    def __init__(self, mm: mmap.mmap, arr: np.ndarray) -> None:
        self.mm = mm
        self.arr = arr
        self.users = 0
        self.revoked = False


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

    def __init__(self, tcp: TcpTransport, grant: GrantFn, *, timeout: float = 10.0) -> None:
        self.tcp = tcp
        self.timeout = timeout
        self._host = host_id()
        self._same: dict[bytes, bool] = {}
        self._maps: collections.OrderedDict[tuple[bytes, int, int, bytes], _Mapping] = \
            collections.OrderedDict()
        self._lock = threading.Condition()
        self.grants = ShmGrants(tcp, grant)
        tcp.on_shm_revoke = self.revoke
        tcp.on_shm_revoked = self.grants.revoked
        tcp.on_peer_forgotten.append(self.forget_peer)
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
        # Only a hint (the owner hands over its memory itself, after checking the key): a
        # regular file holding the nonce the peer's address names. Never block on a FIFO.
        try:
            fd = os.open(f"/proc/{int(peer.pid)}/fd/{int(peer.probe_fd)}",
                         os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, ValueError):
            return False  # other pid namespace or no permission: not reachable through memory
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not peer.probe_nonce:
                return False
            return os.pread(fd, len(peer.probe_nonce), 0) == peer.probe_nonce
        except OSError:
            return False
        finally:
            os.close(fd)

    def reaches(self, peer: EngineAddress, desc: RegionDescriptor | None) -> bool:
        return desc is not None and desc.shm and self.same_host(peer)

    # -- mappings ---------------------------------------------------------------------------

    def _mapping(self, peer: EngineAddress, desc: RegionDescriptor, need: Access) -> _Mapping:
        """The mapping of ``desc``'s region with access ``need``, counted as in use (release it
        with :meth:`_release`); asks the owner for the memory the first time."""
        # the key is part of the cache key: a mapping opened with the right key never serves
        # an op that names another (it asks the owner, and is refused before a byte moves)
        key = (peer.engine_id, desc.region_id, int(need), desc.key)
        with self._lock:
            hit = self._maps.get(key)
            if hit is not None:
                self._maps.move_to_end(key)
                hit.users += 1
                return hit
        # the owner checks our key and permission, then hands over the region's file itself
        check = Transfer("shm-open", peer=str(peer))
        wop = WireOp(next(self.tcp.op_ids), check, str(peer))
        self.tcp.submit(peer, [simple_chunk(wop, w.Op.SHM_OPEN, region=desc.region_id,
                                            imm=int(need), ext=desc.key)])
        check.wait(self.timeout)
        grant = bytes(check.value or b"")
        if len(grant) <= GRANT.size:
            raise BrokenError(f"peer {peer} sent a malformed shared-memory grant", peer=str(peer))
        ticket, nbytes = GRANT.unpack_from(grant)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                status, nbytes, fd = redeem(grant[GRANT.size:], ticket, self.timeout)
                break
            except Unanswered as exc:  # turned away unanswered (busy): try again
                if time.monotonic() > deadline:
                    raise BrokenError(f"peer {peer} did not hand over its shared memory: "
                                      f"{exc}", peer=str(peer)) from exc
                time.sleep(0.02)
            except OSError as exc:  # its socket is out of reach (another network namespace)
                raise _NoSharedMemory(str(exc)) from exc
        if fd < 0:
            raise AccessError(f"peer {peer} refused its shared memory for region "
                              f"{desc.region_id} (status {status})", peer=str(peer),
                              region=desc.region_id)
        try:
            if desc.nbytes > nbytes or os.fstat(fd).st_size < nbytes:
                raise AccessError(f"peer {peer}'s region {desc.region_id} is {nbytes} bytes, "
                                  f"not {desc.nbytes} as the descriptor says", peer=str(peer),
                                  region=desc.region_id)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if need & Access.REMOTE_WRITE else 0)
            mm = mmap.mmap(fd, max(nbytes, 1), mmap.MAP_SHARED | mmap.MAP_POPULATE, prot)
        finally:
            os.close(fd)
        m = _Mapping(mm, np.frombuffer(mm, dtype=np.uint8, count=nbytes))
        m.users = 1
        evicted: list[_Mapping] = []
        with self._lock:
            self._maps[key] = m
            while len(self._maps) > _MAX_MAPPINGS:
                evicted.append(self._maps.popitem(last=False)[1])
        for old in evicted:
            self._drop(old)
        return m

    def _release(self, m: _Mapping) -> None:
        with self._lock:
            m.users -= 1
            if m.users == 0:
                self._lock.notify_all()
        if m.revoked and m.users == 0:
            self._unmap(m)

    def _drop(self, m: _Mapping) -> None:
        """Forget a mapping: unmapped once the copies using it have finished."""
        with self._lock:
            m.revoked = True
            idle = m.users == 0
        if idle:
            self._unmap(m)

    @staticmethod
    def _unmap(m: _Mapping) -> None:
        m.arr = np.zeros(0, np.uint8)
        try:
            m.mm.close()
        except (BufferError, ValueError):
            pass  # a view is still alive: the mapping goes with it

    def revoke(self, peer_id: bytes, region: int) -> None:
        """The owner unregistered ``region``: drop its mappings once in-flight copies finish.
        Later ops ask the owner again (and are refused)."""
        with self._lock:
            keys = [k for k in self._maps if k[0] == peer_id and k[1] == region]
            gone = [self._maps.pop(k) for k in keys]
            for m in gone:
                m.revoked = True
            self._lock.wait_for(lambda: all(m.users == 0 for m in gone), _REVOKE_WAIT)
        for m in gone:
            if m.users == 0:
                self._unmap(m)

    def forget_peer(self, peer_id: bytes) -> None:
        """A peer gone past its grace: release every mapping of its memory."""
        with self._lock:
            keys = [k for k in self._maps if k[0] == peer_id]
            gone = [self._maps.pop(k) for k in keys]
            self._same.pop(peer_id, None)
        for m in gone:
            self._drop(m)

    # -- ops --------------------------------------------------------------------------------

    def _writable(self, peer: EngineAddress, desc: RegionDescriptor, end: int) -> _Mapping | None:
        """The mapping to write ``desc``'s region through, counted as in use (release it with
        :meth:`_release`) and checked to reach ``end``; None where the peer's memory is out of
        reach (the caller goes over tcp)."""
        try:
            m = self._mapping(peer, desc, Access.REMOTE_WRITE)
        except _NoSharedMemory:
            self._same[peer.engine_id] = False
            return None
        if end > m.arr.nbytes:  # the engine checked the descriptor; this is the owner's size
            self._release(m)
            raise AccessError(f"write ends at {end}, outside peer {peer}'s {m.arr.nbytes}-byte "
                              f"region {desc.region_id}", peer=str(peer), region=desc.region_id)
        return m

    def write(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src: memoryview,
              src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
              imm: int | None) -> None:
        if len(lengths) == 1:  # (one segment, from a scatter or merged pages: Python ints)
            end = int(dst_off[0]) + int(lengths[0])
        else:
            end = int((dst_off + lengths).max()) if len(lengths) else 0
        m = self._writable(peer, desc, end)
        if m is None:
            self.tcp.write(peer, desc, wop, src, src_off, dst_off, lengths, imm)
            return
        srcarr = np.frombuffer(src, dtype=np.uint8)

        def notify() -> None:
            ext = w.OP_HEAD.pack(desc.key, end) + w.segments_table(dst_off, lengths)
            chunk = simple_chunk(wop, w.Op.SHM_DONE, region=desc.region_id, imm=imm or 0,
                                 flags=w.FLAG_IMM if imm is not None else 0, ext=ext)
            self.tcp.submit(peer, [chunk])

        self._copy(wop, m, m.arr, srcarr, src_off, dst_off, lengths, notify)

    def write_one(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp,
                  src: memoryview, src_offset: int, dst_offset: int, nbytes: int,
                  imm: int | None) -> None:
        """One segment (most writes): copied here and noticed without numpy temporaries."""
        if nbytes > _INLINE_COPY:  # the copy threads take it
            super().write_one(peer, desc, wop, src, src_offset, dst_offset, nbytes, imm)
            return
        end = dst_offset + nbytes
        m = self._writable(peer, desc, end)
        if m is None:
            self.tcp.write_one(peer, desc, wop, src, src_offset, dst_offset, nbytes, imm)
            return
        try:
            if wop.dead:
                return
            if nbytes <= _SMALL_COPY:  # (a memcpy under the GIL: shorter than releasing it)
                m.arr.data[dst_offset:end] = src[src_offset:src_offset + nbytes]
            else:  # numpy copies without the GIL
                m.arr[dst_offset:end] = np.frombuffer(src, np.uint8, nbytes, src_offset)
        except Exception as exc:  # reported on the transfer, like the copy threads' errors
            raise BrokenError(f"shared-memory copy failed: {exc}", peer=str(peer)) from exc
        finally:
            self._release(m)
        self.tcp.submit(peer, [notice_frame(wop, w.Op.SHM_DONE, desc.region_id, desc.key, imm,
                                            dst_offset, nbytes)])

    def read(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src_offset: int,
             dst: memoryview) -> None:
        try:
            m = self._mapping(peer, desc, Access.REMOTE_READ)
        except _NoSharedMemory:
            self._same[peer.engine_id] = False
            self.tcp.read(peer, desc, wop, src_offset, dst)
            return
        if src_offset + dst.nbytes > m.arr.nbytes:
            self._release(m)
            raise AccessError(f"read outside peer {peer}'s {m.arr.nbytes}-byte region "
                              f"{desc.region_id}", peer=str(peer), region=desc.region_id)

        def done() -> None:
            wop.remaining = 1
            wop.chunk_replied(w.Status.OK, "")

        self._copy(wop, m, np.frombuffer(dst, dtype=np.uint8), m.arr,
                   np.array([src_offset], dtype=np.int64), np.zeros(1, dtype=np.int64),
                   np.array([dst.nbytes], dtype=np.int64), done)

    def _copy(self, wop: WireOp, m: _Mapping, dst: np.ndarray, src: np.ndarray,
              src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
              then: Callable[[], None]) -> None:
        """Copy the segments (inline when small, else on up to COPY_THREADS workers at once),
        release the mapping ``m`` and call ``then`` once, from whichever thread finished last."""
        n = int(lengths[0]) if len(lengths) == 1 else -1
        if 0 <= n <= _INLINE_COPY:  # one segment, copied here without the planner
            s, d = int(src_off[0]), int(dst_off[0])
            err: BaseException | None = None
            try:
                if not wop.dead:
                    dst[d:d + n] = src[s:s + n]  # (numpy copies big ones without the GIL)
            except Exception as exc:  # noqa: BLE001 - reported on the transfer
                err = exc
            self._release(m)
            self._finish(wop, then, err)
            return
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
            if not last:
                return
            self._release(m)
            self._finish(wop, then, failed[0] if failed else None)

        total = int(lengths.sum()) if len(lengths) else 0
        if total <= _INLINE_COPY:
            run(parts[0])
        else:
            for part in parts:
                self._work.put(functools.partial(run, part))

    @staticmethod
    def _finish(wop: WireOp, then: Callable[[], None], failed: BaseException | None) -> None:
        """After the last copy: ``then`` (send the notice), or the failure on the transfer."""
        if wop.dead:
            return
        try:
            if failed is not None:
                raise failed
            then()
        except TensorFabricError as exc:
            wop.transfer._fail(exc)
        except Exception as exc:  # keep the worker alive; report on the transfer
            wop.transfer._fail(BrokenError(f"shared-memory copy failed: {exc}"))

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
        self.grants.close()
        with self._lock:
            maps = list(self._maps.values())
            self._maps.clear()
        for m in maps:
            self._unmap(m)

