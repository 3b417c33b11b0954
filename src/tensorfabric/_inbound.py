"""The engine's inbound side: the region table check, immediates and the message inbox.

These are the :class:`~.transports._base.InboundHandler` methods the transports call from their
threads, and the user calls that consume what arrived (``expect``, ``recv``).
"""

from __future__ import annotations

import collections
import hmac
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _wire as w
from ._wire import charge
from ._address import EngineAddress
from ._checks import _imm
from ._errors import ClosedError, ConfigError
from ._region import Access, MemoryRegion
from ._transfer import Transfer
from .transports._shm_grant import GRANT

if TYPE_CHECKING:
    from .transports._nixl import NixlTransport
    from .transports._shm import ShmTransport
    from .transports._tcp import TcpTransport

_NO_SEGMENTS = np.zeros(0, dtype=w.SEG_DTYPE)

_RECENT_OPS = 1 << 16  # completed (peer, op) pairs remembered to drop resent duplicates
#: bounds on what peers can leave behind: different immediates counted but not yet expected,
#: and multi-chunk ops with an immediate whose other chunks have not come (per peer)
MAX_IMM_VALUES = 1 << 16
MAX_PARTIAL_PER_PEER = 4096
_OK = (0, "")
#: send/recv tags from here up carry add-on transports' control messages (e.g. nixl's
#: region-open requests), handled by that transport instead of the inbox
CONTROL_TAG_BASE = 0xFFFF_FFFF_0000_0000


class Message(NamedTuple):
    """A two-sided message received with :meth:`Engine.recv`."""

    peer: bytes  #: the sender's address; pass it to ``send`` to answer
    tag: int
    data: bytes


class Inbound:
    """Mixin of :class:`~._engine.Engine`: what peers' operations do here."""

    _regions: dict[int, MemoryRegion]
    _closed: bool
    _imm_lock: threading.Lock
    _imm_counts: collections.Counter[int]
    _imm_waiters: dict[int, collections.deque[list[Any]]]
    _partial: dict[tuple[bytes, int], tuple[float, set[int]]]
    _partial_per_peer: collections.Counter[bytes]
    _recent: collections.OrderedDict[tuple[bytes, int], None]
    _inbox_lock: threading.Lock
    _inbox: dict[int, collections.deque[Message]]
    _inbox_waiters: dict[int, collections.deque[Transfer]]
    _inbox_bytes: int
    _inbox_limit: int
    _inbox_share: int  # what one peer's unread messages may take of the inbox
    _inbox_peer: collections.Counter[bytes]  # unread bytes per sender (address bytes)
    _nixl: NixlTransport | None
    _shm: ShmTransport | None
    _tcp: TcpTransport
    _lock: threading.Lock

    if TYPE_CHECKING:  # provided by Engine
        def _check_open(self) -> None: ...
        def _new_transfer(self, kind: str, nbytes: int, parts: int, timeout: float | None,
                          peer: str | None) -> Transfer: ...

    def recv_async(self, *, tag: int = 0, timeout: float | None = None) -> Transfer:
        """A transfer whose ``value`` is the next :class:`Message` with ``tag``."""
        self._check_open()
        t = self._new_transfer("recv", 0, 1, timeout, None)
        t._reader = self._tcp.poller  # its waiter may read the message itself (``_poller``)
        closed = False
        with self._inbox_lock:
            box = self._inbox.get(tag)
            if box:
                msg = box.popleft()
                self._uncharge(msg.peer, charge(len(msg.data)))
            else:
                msg = None
                # close() sets _closed before it takes this lock to fail the waiters: one
                # that came in after it would wait out its timeout
                closed = self._closed
                if not closed:
                    self._inbox_waiters.setdefault(tag, collections.deque()).append(t)
        if msg is not None:
            t._complete(msg)
        elif closed:
            t._fail(ClosedError("engine closed"))
        return t

    def recv(self, *, tag: int = 0, timeout: float | None = None) -> Message:
        """Wait for the next message with ``tag``; raises TransferTimeout after ``timeout``."""
        msg: Message = self.recv_async(tag=tag, timeout=timeout).result()
        return msg

    def expect(self, imm: int, count: int = 1, *, timeout: float | None = None) -> Transfer:
        """A transfer that completes once ``count`` ops carrying ``imm`` have fully landed here.

        Arrivals before the call are counted too; a completed expect consumes its ``count``.
        """
        self._check_open()
        value = _imm(imm)
        if value is None or not isinstance(count, int) or count < 1:
            raise ConfigError("expect needs an immediate value and a count >= 1")
        t = self._new_transfer("expect", 0, 1, timeout, None)
        t._reader = self._tcp.poller  # its waiter may read the last op's frame itself
        waiter: list[Any] = [count, t, 0]  # wanted, transfer, consumed so far
        with self._imm_lock:
            have = self._imm_counts.get(value, 0)
            ready = have >= count and not self._imm_waiters.get(value)
            closed = not ready and self._closed  # see recv_async
            if ready:
                self._set_count(value, have - count)
            elif not closed:
                self._imm_waiters.setdefault(value, collections.deque()).append(waiter)
        if ready:
            t._part_done()
            return t
        if closed:
            t._fail(ClosedError("engine closed"))
            return t
        self._drain_imm(value)

        def give_back() -> None:  # a timed-out or cancelled expect returns what it consumed
            with self._imm_lock:
                q = self._imm_waiters.get(value)
                if q is not None and waiter in q:
                    q.remove(waiter)
                    if waiter[2]:
                        self._imm_counts[value] += int(waiter[2])
            self._drain_imm(value)

        t._on_abort(give_back)
        return t


    # -- InboundHandler (called by transports) --------------------------------------------

    def write_targets(self) -> dict[int, MemoryRegion]:
        return self._regions

    def resolve(self, region: int, key: bytes, need: int, table: np.ndarray | tuple[int, int],
                end: int = 0) -> tuple[int, str, memoryview | None]:
        r = self._regions.get(region)
        view = None if r is None else r._view  # None: deregistered (or closing)
        if r is None or view is None:
            return w.Status.NO_REGION, f"region {region} is not registered", None
        if not hmac.compare_digest(r._key, key):
            return w.Status.BAD_KEY, f"wrong access key for region {region}", None
        need = int(need)  # plain ints: an IntFlag's & costs three Python calls
        if need not in (1, 2, 3) or (need & r._access_bits) != need:
            what = "write" if need & Access.REMOTE_WRITE else "read"
            return w.Status.NOT_PERMITTED, f"region {region} does not allow remote {what}", None
        if end > view.nbytes:  # the whole op, not only this chunk: refused before it lands
            return (w.Status.OUT_OF_BOUNDS, f"op reaches byte {end}, outside region {region} "
                    f"({view.nbytes} bytes)", None)
        if isinstance(table, tuple):  # one segment (offset, length), as Python ints
            off1, n1 = table
            if off1 + n1 > view.nbytes:
                return (w.Status.OUT_OF_BOUNDS,
                        f"access outside region {region} ({view.nbytes} bytes)", None)
        elif len(table):
            size = np.uint64(view.nbytes)
            off, n = table["offset"], table["length"]
            if not bool(np.all((off <= size) & (n <= size - np.minimum(off, size)))):
                return (w.Status.OUT_OF_BOUNDS,
                        f"access outside region {region} ({view.nbytes} bytes)", None)
        return w.Status.OK, "", view

    def shm_open(self, peer_id: bytes, region: int, key: bytes,
                 need: int) -> tuple[int, str, bytes]:
        status, text, _ = self.resolve(region, key, need, _NO_SEGMENTS)
        if status != w.Status.OK:
            return status, text, b""
        r = self._regions.get(region)
        shm = self._shm
        if r is None or not r.shares_memory or shm is None:
            return w.Status.NOT_PERMITTED, f"region {region} is not shared through memory", b""
        ticket = shm.grants.issue(peer_id, region, bool(need & Access.REMOTE_WRITE))
        return w.Status.OK, "", GRANT.pack(ticket, r.nbytes) + shm.grants.name

    def _shm_grant(self, peer_id: bytes, region: int, writable: bool) -> tuple[int, int] | None:
        """Open a region's file for a peer that redeemed its ticket, if the region is still
        registered (checked against the current table) and grants that access."""
        with self._lock:
            r = self._regions.get(region)
            if r is None or r.closed or r._shm is None or not r.shares_memory:
                return None
            if writable and r.access != Access.READ_WRITE:
                return None
            fd = r._shm.open_for_peer(writable)
            r._shm_peers.add(peer_id)
            return fd, r.nbytes

    def landed(self, peer_id: bytes, op_id: int, chunk: int, nchunks: int,
               imm: int | None) -> tuple[int, str]:
        if imm is None:
            return _OK
        key = (peer_id, op_id)
        with self._imm_lock:
            if key in self._recent:
                return _OK  # a resent chunk of an op already counted
            if imm not in self._imm_counts and len(self._imm_counts) >= MAX_IMM_VALUES:
                return w.Status.INBOX_FULL, (
                    f"{MAX_IMM_VALUES} different immediates are waiting for expect(): this "
                    "one is refused")
            if nchunks > 1:
                entry = self._partial.get(key)
                if entry is None:
                    if self._partial_per_peer[peer_id] >= MAX_PARTIAL_PER_PEER:
                        return w.Status.INBOX_FULL, (
                            f"{MAX_PARTIAL_PER_PEER} multi-chunk ops with an immediate are "
                            "unfinished from this peer")
                    entry = self._partial[key] = (time.monotonic(), set())
                    self._partial_per_peer[peer_id] += 1
                if nchunks > len(entry[1]):
                    entry[1].add(chunk)
                if len(entry[1]) < nchunks:
                    return _OK
                self._drop_partial(key)
            self._recent[key] = None
            if len(self._recent) > _RECENT_OPS:
                self._recent.popitem(last=False)
            counts = self._imm_counts  # (.get: a Counter's __missing__ is a Python call)
            counts[imm] = counts.get(imm, 0) + 1
        self._drain_imm(imm)
        return _OK

    def _drop_partial(self, key: tuple[bytes, int]) -> None:
        """Forget an unfinished op (the imm lock is held)."""
        if self._partial.pop(key, None) is not None:
            self._partial_per_peer[key[0]] -= 1
            if self._partial_per_peer[key[0]] <= 0:
                del self._partial_per_peer[key[0]]

    def forget_partials(self, peer_id: bytes) -> None:
        """A peer is gone: its unfinished ops will never finish."""
        with self._imm_lock:
            for key in [k for k in self._partial if k[0] == peer_id]:
                self._drop_partial(key)

    def _set_count(self, imm: int, n: int) -> None:
        """Set an immediate's unclaimed count; zero entries are dropped (no growth per imm)."""
        if n:
            self._imm_counts[imm] = n
        else:
            self._imm_counts.pop(imm, None)

    def _drain_imm(self, imm: int) -> None:
        done: list[list[Any]] = []
        with self._imm_lock:
            q = self._imm_waiters.get(imm)
            while q:
                waiter = q[0]
                have = self._imm_counts.get(imm, 0)
                take = min(have, waiter[0] - waiter[2])
                waiter[2] += take
                self._set_count(imm, have - take)
                if waiter[2] < waiter[0]:
                    break
                q.popleft()
                done.append(waiter)
            if q is not None and not q:
                del self._imm_waiters[imm]
        give_back = 0
        for waiter in done:
            if not waiter[1]._complete(None):
                give_back += waiter[0]  # it timed out meanwhile: return what it consumed
        if give_back:
            with self._imm_lock:
                self._imm_counts[imm] += give_back
            self._drain_imm(imm)

    def reserve_inbox(self, nbytes: int, peer: bytes = b"") -> bool:
        with self._inbox_lock:
            if not self._room(nbytes, peer):
                return False
            self._inbox_bytes += nbytes
            self._inbox_peer[peer] += nbytes
            return True

    def release_inbox(self, nbytes: int, peer: bytes = b"") -> None:
        if nbytes:
            with self._inbox_lock:
                self._uncharge(peer, nbytes)

    def _room(self, nbytes: int, peer: bytes) -> bool:
        """Whether ``nbytes`` more fit, in all and in this peer's share (inbox lock held):
        one peer whose messages nobody reads cannot take the whole inbox from the others."""
        return (self._inbox_bytes + nbytes <= self._inbox_limit
                and self._inbox_peer.get(peer, 0) + nbytes <= self._inbox_share)

    def _uncharge(self, peer: bytes, nbytes: int) -> None:
        self._inbox_bytes -= nbytes
        left = self._inbox_peer.get(peer, 0) - nbytes
        if left > 0:
            self._inbox_peer[peer] = left
        else:
            self._inbox_peer.pop(peer, None)

    def deliver(self, peer: EngineAddress, tag: int, data: bytes,
                reserved: int = 0) -> tuple[int, str]:
        key = peer.to_bytes()
        if tag >= CONTROL_TAG_BASE and self._nixl is not None:
            self.release_inbox(reserved, key)
            return self._nixl.on_control(peer, tag, data)
        msg = Message(key, tag, data)
        while True:
            with self._inbox_lock:
                waiters = self._inbox_waiters.get(tag)
                t = waiters.popleft() if waiters else None
                if t is None:
                    cost = charge(len(data))
                    if not self._room(cost - reserved, key):
                        if reserved:
                            self._uncharge(key, reserved)
                        return w.Status.INBOX_FULL, (
                            f"receiver's inbox is full ({self._inbox_limit} bytes in all, "
                            f"{self._inbox_share} per sender, unread); it is not calling recv()")
                    self._inbox.setdefault(tag, collections.deque()).append(msg)
                    self._inbox_bytes += cost - reserved
                    self._inbox_peer[key] += cost - reserved
                    return _OK
            if t._complete(msg):
                self.release_inbox(reserved, key)
                return _OK
            # that waiter had timed out: offer the message to the next one

    def _sweep_partial(self, now: float) -> None:
        with self._imm_lock:
            stale = [k for k, (t0, _) in self._partial.items() if now - t0 > 600]
            for k in stale:
                self._drop_partial(k)


