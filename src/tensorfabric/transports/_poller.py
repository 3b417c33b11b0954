"""One epoll over every accepted plain tcp link, so the caller waiting in ``recv`` or
``expect`` reads the frame it waits for itself.

Without it a message arrives on an accepted link's receive thread, which delivers it and
wakes the caller blocked in ``recv``: two thread wake-ups per message where a raw socket has
one, and on a loaded two-core machine each costs more than the frame's own Python. With it:

* every accepted plain link's fd sits in one epoll in one-shot mode; each link's receive
  thread waits on that epoll and reads whichever link has data (``Conn.rlock`` makes one
  reader per link at a time; ``Conn._pump`` reads to a frame boundary and re-arms the fd);
* a caller whose ``recv``/``expect`` transfer is not done yet takes the poller (one caller
  at a time; the others wait as in ``block_on``) and polls the same epoll itself, so the frame
  it waits for is parsed, checked (MACs, sequence numbers, bounds: the same ``Conn`` code) and
  delivered in its own thread;
* while a caller holds the poller the receive threads park (a condition), so the kernel hands
  every event to the caller; when it lets go they are woken to take over;
* a caller that keeps coming back (its wait began within ``_LINGER`` of the one before it
  ending: a request/response loop) keeps the links for ``_LINGER`` after each wait, and the
  parked threads are not woken: a frame that comes in between (the peer's reply, arriving
  while the caller still waits for its send's acknowledgement) is read by its next wait, not
  by a receive thread that would wake, deliver and hand over (two wake-ups). The dialled
  links' receive threads hold off too (``hold_off``): the caller reads its acknowledgement on
  the link it dialled itself (``Conn.read_for``). When the caller does not come back in time
  the sentry ends the hold and wakes the parked threads, so a frame waits at most ``_LINGER``
  for a reader; a caller slower than that lets go at once. A thread that waits for a transfer
  it cannot read for (several replies, or replies that come another way: ``block_on``) ends
  a hold, and none begins while it waits;
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
#: a caller whose waits follow each other this closely keeps the links this long after each
_LINGER = 0.002


def available() -> bool:
    return hasattr(select, "epoll") and hasattr(os, "eventfd")


class Blocker:
    """The reader of a transfer whose waiter cannot read its own reply (it has several, or
    they come another way): it ends a caller's hold on the links before the waiter blocks,
    so the receive threads read them now (see ``Poller.block_on``)."""

    __slots__ = ("poller", "blocker")

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.blocker = self  # (what a group of transfers takes from its parts' readers)

    def read_for(self, transfer: Any, timeout: float) -> None:
        self.poller.block_on(transfer, timeout)

    def kick(self) -> None:
        """(Nothing polls for such a transfer.)"""


class Poller:
    """See the module docstring. Thread-safe."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self._efd, ARM)
        self.conns: dict[int, Conn] = {}
        lock = threading.RLock()
        self._cv = threading.Condition(lock)
        self._scv = threading.Condition(lock)  # the sentry's own: a caller can wake it alone
        self._caller = threading.Lock()  # held by the one caller polling
        self._holder: int | None = None  # that caller's thread id
        self._parked = 0  # receive threads parked while a caller polls
        self._sentry = False  # one of them looks for links the caller leaves waiting
        self._recruits = 0  # parked threads asked to help serve such links
        self._current = -1  # the link the caller read last
        self._polled_at = 0.0  # when it last came back to its poll
        self._due = 0.0  # a caller that let go keeps the links until then (0: none)
        self._let_go = 0.0  # when a caller last let go
        self._sentry_until = 0.0  # when the sentry's current wait ends
        self._blocked: list[None] = []  # one entry per thread in block_on
        self._took = 0.0  # when the caller polling took the poller
        self._looping = False  # it came back within _LINGER of the last wait (see hold_off)
        self._users = 0  # callers and receive threads that may touch the epoll or the eventfd
        self._released = False  # release() was called: the last user out closes the fds
        self._fdlock = threading.Lock()  # a kick's write vs closing the eventfd
        self.closed = False
        #: the reader of transfers that cannot be read for (see ``Blocker``)
        self.blocker = Blocker(self)

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
            self._scv.notify_all()
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
        """Wait while a caller polls or keeps the links. True: look for links it leaves
        waiting (this thread is the sentry and its look is due, or it was recruited); False:
        no caller polls or keeps the links, serve."""
        with self._cv:
            while conn.alive and not self.closed:
                now = time.monotonic()
                if self._holder is None:
                    if not self._due:
                        return False
                    if now >= self._due:  # the caller did not come back: the others serve too
                        self._due = 0.0
                        if self._parked:
                            self._cv.notify_all()
                        return False
                if self._recruits:
                    self._recruits -= 1
                    return True
                self._parked += 1
                if self._sentry:
                    # the others wake now and then to stand in for a sentry whose link closed
                    try:
                        self._cv.wait(1.0)
                    finally:
                        self._parked -= 1
                    continue
                self._sentry = True
                if self._holder is None:
                    until = self._due
                elif now - self._let_go < _LINGER:
                    until = now + _LINGER  # a caller in a request/response loop
                else:
                    until = now + _PARK
                self._sentry_until = until
                try:
                    timed_out = not self._scv.wait(until - now)
                finally:
                    self._parked -= 1
                    self._sentry = False
                if timed_out and self._holder is not None:
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
        """Read the accepted links' frames in the calling thread until ``transfer`` is done
        or ``timeout`` passes; while another caller polls, wait as ``block_on`` does."""
        if not self.conns or self.closed:
            return
        if not self._caller.acquire(blocking=False):
            self.block_on(transfer, timeout)  # another caller polls
            return
        with self._cv:
            if self.closed:
                self._caller.release()
                return
            self._users += 1  # see _leave
            self._holder = threading.get_ident()
            self._took = now = time.monotonic()
            back = self._looping = now - self._let_go < _LINGER  # a wait right after the last
            self._due = 0.0
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
                self._looping = False
                self._recruits = 0
                self._let_go = now = time.monotonic()
                if back and not self.closed:
                    # keep the links a while: the parked threads sleep on; the sentry, if its
                    # wait ends later, is woken to end the hold in time
                    self._due = now + _LINGER
                    if self._blocked:  # (after setting it: see block_on) no hold, then
                        self._due = 0.0
                    elif self._sentry and self._sentry_until > self._due:
                        self._scv.notify()
                if not self._due and self._parked:
                    self._cv.notify_all()
                    self._scv.notify()
                self._users -= 1
                last = self._users == 0 and self._released
            if last:
                self._close_fds()
            self._caller.release()

    @property
    def holding(self) -> bool:
        """A caller keeps the links, or polls in a request/response loop (no lock: a hint)."""
        return bool(self._due) or self._looping

    def hold_off(self, conn: Conn) -> None:
        """A dialled link's receive thread, before it polls its link: wait while a caller
        keeps the links between its waits, or polls in a request/response loop (it reads its
        reply on that link itself, in its next wait: a frame read here would cost a wake-up
        and a hand-off); at most ``_LINGER`` past the loop's last wait, since this thread is
        not the one that ends a hold, and never while a thread waits in ``block_on``."""
        with self._cv:
            while conn.alive and not self.closed and not self._blocked:
                now = time.monotonic()
                if self._holder is None:
                    until = self._due
                elif self._looping:
                    until = self._took + _LINGER
                else:
                    return
                if until <= now:
                    return
                self._parked += 1
                try:
                    self._cv.wait(until - now)
                finally:
                    self._parked -= 1

    def block_on(self, transfer: Any, timeout: float) -> None:
        """Wait for ``transfer`` to finish (or ``timeout``) without polling: its frames are
        read by a caller that polls or by the receive threads. While any thread waits so, no
        caller keeps the links after its wait, and a hold already begun ends now."""
        blocked = self._blocked
        blocked.append(None)  # (atomic: no lock on this path, taken by every such wait)
        try:
            if self._due:  # after the append: a caller letting go sees it, or we see its hold
                self._unhold()
            gate = transfer._gate
            if gate.acquire(timeout=min(max(0.0, timeout), threading.TIMEOUT_MAX)):
                gate.release()  # let the next waiter through
        finally:
            blocked.pop()

    def _unhold(self) -> None:
        with self._cv:
            if self._due and self._holder is None:
                self._due = 0.0
                if self._parked:
                    self._cv.notify_all()
                    self._scv.notify()

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
            self._scv.notify_all()
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
