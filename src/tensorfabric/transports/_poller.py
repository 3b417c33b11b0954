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
  every event to the caller; when it lets go they are woken to take over;
* one caller never holds every link: while it polls, one parked thread (the sentry) looks
  every ``_PARK`` seconds, without blocking, for a link that is readable and that nobody has
  taken. There is one only when the caller is not in its poll: it is reading a large frame,
  running a delivery's callbacks, or waiting for the GIL on a busy machine. The sentry then
  wakes one more parked thread and serves that link; each thread that finds another such
  link recruits one more, so a backlog is read by as many threads as there are links waiting,
  as without the poller, and the threads park again when none is left. The link the caller
  read last is left to it while it keeps coming back to its poll (a link it streams: a
  second reader would only take turns with it);
* a transfer finished by another thread (a frame read on a dialled link, a timeout, a cancel)
  kicks an eventfd in the epoll, so the caller never sleeps on a finished transfer;
* closing wakes the polling caller (it returns, and its transfer fails with the engine's
  ``ClosedError``); the epoll and the eventfd are closed by the last thread to stop using them,
  never under a caller or receive thread still polling (a closed fd's number is soon reused).

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
#: while a caller polls, links it leaves readable are taken over after at most this long
_PARK = 0.05


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
        self._parked = 0  # receive threads parked while a caller polls
        self._sentry = False  # one of them looks for links the caller leaves waiting
        self._recruits = 0  # parked threads asked to help serve such links
        self._current = -1  # the link the caller read last
        self._polled_at = 0.0  # when it last came back to its poll
        self._users = 0  # callers and receive threads that may touch the epoll or the eventfd
        self._released = False  # release() was called: the last user out closes the fds
        self._fdlock = threading.Lock()  # a kick's write vs closing the eventfd
        self.closed = False

    # -- links ----------------------------------------------------------------------------

    def add(self, conn: Conn) -> bool:
        """Poll ``conn`` from now on; False if it (or the poller) closed already."""
        fd = conn._fd
        with self._cv:  # fail() removes under the same lock: never a closed link's fd
            if self.closed or not conn.alive:
                return False
            self.conns[fd] = conn  # first: an event right after registering finds it
            try:
                self.ep.register(fd, ARM)
            except (OSError, ValueError):
                del self.conns[fd]
                return False
        return True

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
        if not self._enter():
            return
        try:
            self._serve(conn)
        finally:
            self._leave()

    def _serve(self, conn: Conn) -> None:
        ep = self.ep
        while conn.alive and not self.closed:
            if self._park(conn):
                self._probe()
                continue
            try:
                events = ep.poll(1.0, 1)
            except (OSError, ValueError):
                return
            for fd, _ in events:
                self._handle(fd, caller=False)

    def _park(self, conn: Conn) -> bool:
        """Wait while a caller polls. True: look for links it leaves waiting (this thread is
        the sentry and its look is due, or it was recruited); False: no caller polls, serve."""
        with self._cv:
            while self._holder is not None and conn.alive and not self.closed:
                if self._recruits:
                    self._recruits -= 1
                    return True
                sentry = not self._sentry
                if sentry:
                    self._sentry = True
                self._parked += 1
                try:
                    # the others wake now and then to stand in for a sentry whose link closed
                    timed_out = not self._cv.wait(_PARK if sentry else 1.0)
                finally:
                    self._parked -= 1
                    if sentry:
                        self._sentry = False
                if sentry and timed_out and self._holder is not None:
                    return True
            return False

    def _probe(self) -> None:
        """Serve the links that are readable and that no one has taken (the caller is not in
        its poll), one by one without blocking, recruiting a parked thread for each."""
        left: set[int] = set()  # left to the caller, re-armed: seen again = went round
        while not self.closed:
            try:
                events = self.ep.poll(0, 1)
            except (OSError, ValueError):
                return
            if not events:
                return
            fd = events[0][0]
            if fd in left:
                self._rearm(fd)
                return
            if fd == self._efd or self._callers_link(fd):
                left.add(fd)
                if fd == self._efd:
                    self._handle(fd, caller=False)
                else:
                    self._rearm(fd)
                continue
            with self._cv:
                if self._holder is not None and self._parked > self._recruits:
                    self._recruits += 1  # there may be more: one more thread looks
                    self._cv.notify()
            self._handle(fd, caller=False)
            if self._holder is None:
                return  # no caller polls any more: back to blocking polls

    def _callers_link(self, fd: int) -> bool:
        """The link the caller read last, while it keeps coming back to its poll: a busy
        link it is streaming (taking it would only make two threads take turns on it)."""
        return fd == self._current and time.monotonic() - self._polled_at < _PARK

    def _handle(self, fd: int, caller: bool) -> None:
        if fd == self._efd:
            # spent when read by the caller, or a kick left by a caller gone; on close it
            # stays, so every polling thread sees it in turn (one-shot, re-armed below)
            if not self.closed and (caller or self._holder is None):
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            self._rearm(self._efd)  # a receive thread leaves a kick to the polling caller
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
        with self._cv:
            if self.closed:
                self._caller.release()
                return
            self._users += 1  # see _leave
            self._holder = threading.get_ident()
        try:
            deadline = time.monotonic() + timeout
            while not transfer._done and not self.closed:
                self._polled_at = now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return
                try:
                    events = self.ep.poll(min(left, _SLICE), 1)
                except (OSError, ValueError):
                    return
                for fd, _ in events:
                    self._current = fd
                    self._handle(fd, caller=True)
        finally:
            with self._cv:
                self._holder = None
                self._recruits = 0
                if self._parked:
                    self._cv.notify_all()
                self._users -= 1
                last = self._users == 0 and self._released
            if last:
                self._close_fds()
            self._caller.release()

    def kick(self) -> None:
        """A transfer a caller may be polling for finished in another thread: wake it."""
        holder = self._holder
        if holder is not None and holder != threading.get_ident():
            self._wake()

    def _wake(self) -> None:
        with self._fdlock:  # the eventfd stays open while we write it
            if self._efd >= 0:
                try:
                    os.eventfd_write(self._efd, 1)
                except OSError:
                    pass

    # -- closing ------------------------------------------------------------------------------

    def _enter(self) -> bool:
        """A thread starts using the epoll and eventfd; False once the poller is closed."""
        with self._cv:
            if self.closed:
                return False
            self._users += 1
            return True

    def _leave(self) -> None:
        with self._cv:
            self._users -= 1
            last = self._users == 0 and self._released
        if last:
            self._close_fds()

    def close(self) -> None:
        """Stop: parked threads end, a polling caller is woken and returns."""
        with self._cv:
            self.closed = True
            self._cv.notify_all()
        self._wake()

    def release(self) -> None:
        """Close the epoll and eventfd (after close()): now if no thread uses them, else when
        the last one stops (a caller or receive thread may still be between its poll and
        reading the eventfd; closing under it would raise EBADF there, or read a reused fd)."""
        with self._cv:
            self.closed = True
            self._released = True
            idle = self._users == 0
        if idle:
            self._close_fds()

    def _close_fds(self) -> None:
        with self._fdlock:
            efd, self._efd = self._efd, -1
        if efd < 0:
            return
        self.ep.close()
        try:
            os.close(efd)
        except OSError:
            pass
