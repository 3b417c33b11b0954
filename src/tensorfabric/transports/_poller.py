"""One epoll over every accepted plain tcp link, so the caller waiting in ``recv`` or
``expect`` reads the frame it waits for itself.

Without it a message arrives on an accepted link's receive thread, which delivers it and
wakes the caller blocked in ``recv``: two thread wake-ups per message where a raw socket has
one, and on a loaded two-core machine each costs more than the frame's own Python. With it:

* every accepted plain link's fd sits in one epoll in one-shot mode; each link's receive
  thread waits on that epoll and reads whichever link has data (``Conn.rlock`` makes one
  reader per link at a time; ``Conn._pump`` reads to a frame boundary and re-arms the fd);
* a caller whose ``recv``/``expect`` transfer is not done yet takes the poller (one caller at
  a time; the others wait as before) and polls the same epoll itself, so the frame it waits
  for is parsed, checked (MACs, sequence numbers, bounds: the same ``Conn`` code) and
  delivered in its own thread;
* while a caller holds the poller the receive threads park (a condition), so the kernel hands
  every event to the caller; when it lets go they are woken to take over. A caller busy on
  one link's frame for long (a large payload) does not hold up the others: parked threads
  look every ``_PARK`` seconds and serve the other links while it is;
* a transfer finished by another thread (a frame read on a dialled link, a timeout, a cancel)
  kicks an eventfd in the epoll, so the caller never sleeps on a finished transfer.

TLS links keep a receive thread each that blocks in ``recv`` (an SSL socket's buffered
records are invisible to epoll).
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._link import Conn

ARM = (select.EPOLLIN | select.EPOLLONESHOT) if hasattr(select, "epoll") else 0
#: a caller re-checks its transfer at least this often (a transfer finished elsewhere kicks
#: it at once; a short slice would leave gaps in which a receive thread takes its frame)
_SLICE = 1.0
_PARK = 0.1  #: a parked receive thread checks this often whether the caller is stuck in a frame


def available() -> bool:
    return hasattr(select, "epoll") and hasattr(os, "eventfd")


class Poller:
    """See the module docstring. Thread-safe."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self._efd, ARM)
        self.conns: dict[int, Conn] = {}
        self._cv = threading.Condition()
        self._caller = threading.Lock()  # held by the one caller polling
        self._holder: int | None = None  # that caller's thread id
        self._busy_since = 0.0  # when that caller started reading a link (0: it is polling)
        self._parked = 0
        self.closed = False

    # -- links ----------------------------------------------------------------------------

    def add(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        with self._cv:
            self.conns[fd] = conn
        self.ep.register(fd, ARM)

    def remove(self, conn: Conn) -> None:
        """Forget ``conn`` (before its socket closes, so a reused fd is never mistaken)."""
        fd = conn._fd
        with self._cv:
            if self.conns.get(fd) is not conn:
                return
            del self.conns[fd]
            self._cv.notify_all()  # its parked receive thread may end
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass

    # -- the receive threads ----------------------------------------------------------------

    def serve(self, conn: Conn) -> None:
        """The receive thread of ``conn``: reads any accepted link's frames while no caller
        polls; ends when ``conn`` is closed."""
        ep = self.ep
        while conn.alive and not self.closed:
            with self._cv:
                while self._holder is not None and conn.alive and not self.closed:
                    busy = self._busy_since
                    if busy and time.monotonic() - busy > _PARK:
                        break  # the caller is stuck in one link's frame: serve the others
                    self._parked += 1
                    try:
                        self._cv.wait(_PARK)
                    finally:
                        self._parked -= 1
                helping = self._holder is not None
            try:
                events = ep.poll(_PARK if helping else 1.0, 1)
            except (OSError, ValueError):
                return
            for fd, _ in events:
                self._handle(fd, caller=False)

    def _handle(self, fd: int, caller: bool) -> None:
        if fd == self._efd:
            if caller:
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            self._rearm(self._efd)  # a receive thread leaves the kick to the caller
            return
        conn = self.conns.get(fd)
        if conn is None:
            return
        lock = conn.rlock
        if not lock.acquire(blocking=False):
            # another thread reads this link: hand the event back, wait until it is done
            self._rearm(fd)
            if lock.acquire(timeout=0.05 if caller else 1.0):  # the caller re-checks soon
                lock.release()
            return
        try:
            conn._pump()
        finally:
            lock.release()

    def _rearm(self, fd: int) -> None:
        try:
            self.ep.modify(fd, ARM)
        except (OSError, ValueError):
            pass

    # -- the caller ---------------------------------------------------------------------------

    def read_for(self, transfer: Any, timeout: float) -> None:
        """Read accepted links' frames in the calling thread until ``transfer`` is done or
        ``timeout`` passes; returns at once when another caller polls (it then waits on the
        transfer as before)."""
        if not self.conns or self.closed or not self._caller.acquire(blocking=False):
            return
        self._holder = threading.get_ident()
        try:
            deadline = time.monotonic() + timeout
            while not transfer._done and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    events = self.ep.poll(min(left, _SLICE), 1)
                except (OSError, ValueError):
                    return
                for fd, _ in events:
                    self._busy_since = time.monotonic()
                    self._handle(fd, caller=True)
                    self._busy_since = 0.0
        finally:
            with self._cv:
                self._busy_since = 0.0
                self._holder = None
                if self._parked:
                    self._cv.notify_all()
            self._caller.release()

    def kick(self) -> None:
        """A transfer a caller may be polling for finished in another thread: wake it."""
        holder = self._holder
        if holder is not None and holder != threading.get_ident():
            try:
                os.eventfd_write(self._efd, 1)
            except OSError:
                pass

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()
        try:
            os.eventfd_write(self._efd, 1)  # wake a polling caller
        except OSError:
            pass

    def release(self) -> None:
        """Close the epoll and eventfd (after the links and their threads are gone)."""
        for close in (self.ep.close, lambda: os.close(self._efd)):
            try:
                close()
            except OSError:
                pass
