"""The links this engine dialled to one peer, their shared chunk queue, redials and giving up."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING

from .._address import EngineAddress
from .._errors import AuthenticationError, BrokenError, TensorFabricError
from .._ops import Chunk
from ._handshake import _PeerGone

if TYPE_CHECKING:
    from ._link import Conn
    from ._tcp import TcpTransport

log = logging.getLogger("tensorfabric.tcp")

_INLINE_MAX = 1 << 20  # one-chunk ops up to this size may be sent from the caller's thread
_HANDSHAKE_TRIES = 3  # link 0's handshake, when the peer cut it off or it ran out of time


class PeerLinks:
    """The links this engine dialled to one peer, and the queue of chunks waiting for them."""

    def __init__(self, transport: TcpTransport, peer: EngineAddress) -> None:
        self.t = transport
        self.peer = peer
        self.name = str(peer)
        self.lock = threading.RLock()  # the cond's lock, taken bare where nobody waits
        self.cond = threading.Condition(self.lock)
        self.queue: collections.deque[Chunk] = collections.deque()
        self.conns: list[Conn | None] = [None] * transport.nlinks
        self._live: list[Conn] | None = None  # conns without the empty slots (None: recount)
        self.rr = 0
        self.down_since: float | None = None
        self.refused = False
        self.last_error: BaseException | None = None
        self.next_redial = [0.0] * transport.nlinks
        self.dialing = [False] * transport.nlinks
        self._dial_locks = [threading.Lock() for _ in range(transport.nlinks)]
        self.closed = False
        self.failures = 0  # links lost so far
        self.requeued = 0  # chunks resent on other links after a loss

    def live(self) -> list[Conn]:
        """The links that are up (a link that failed a moment ago may still be listed until
        :meth:`link_failed` runs: senders check ``alive`` themselves)."""
        cached = self._live
        if cached is None:
            with self.lock:  # the writers reset it under this lock: never cache a stale list
                cached = self._live = [c for c in self.conns if c is not None]
        return [c for c in cached if c.alive]

    def connect_first(self, timeout: float) -> None:
        """Dial link 0 in the caller's thread (so bad secrets and dead peers raise here) and
        the other links in the background. A handshake the peer cut off (or that ran out of
        time after the peer accepted: a loaded machine) is tried again, twice at most; a
        refused connection or a failed secret check is not."""
        if self.live():
            return
        try:
            for attempt in range(_HANDSHAKE_TRIES):
                try:
                    self._dial(0, timeout)
                    break
                except _PeerGone as exc:
                    if attempt == _HANDSHAKE_TRIES - 1 or self.closed:
                        raise
                    log.info("handshake with %s cut off (%s); trying again", self.name, exc)
                    time.sleep(0.1 * 4 ** attempt)
        except BaseException as exc:
            with self.cond:  # never reached: forgotten after the grace like a lost peer
                if self.down_since is None:
                    self.down_since = time.monotonic()
                self.last_error = exc
            if isinstance(exc, (OSError, _PeerGone)):
                raise BrokenError(f"cannot reach peer {self.name}: {exc}",
                                  peer=self.name) from exc
            raise
        for i in range(1, len(self.conns)):
            self._dial_later(i, 0.0)

    def _dial(self, i: int, timeout: float) -> Conn:
        # One dial per link at a time: two threads opening the first link to a peer at once
        # must share it, not replace one with the other (which would resend what the
        # replaced link had in flight).
        with self._dial_locks[i]:
            current = self.conns[i]
            if current is not None and current.alive:
                return current
            conn = self.t._dial(self.peer, i, self)
            with self.cond:
                self.conns[i] = conn
                self._live = None
                self.down_since = None
                self.refused = False
                self.cond.notify_all()
            conn.start()
            return conn

    def _dial_later(self, i: int, delay: float) -> None:
        with self.cond:
            if self.dialing[i] or self.closed:
                return
            self.dialing[i] = True
            self.next_redial[i] = time.monotonic() + delay

        def run() -> None:
            try:
                time.sleep(max(0.0, self.next_redial[i] - time.monotonic()))
                if not self.closed:
                    self._dial(i, self.t.connect_timeout)
            except AuthenticationError as exc:
                self._note_error(exc, refused=True)
            except (OSError, _PeerGone, TensorFabricError) as exc:
                refused = isinstance(exc, ConnectionRefusedError)
                self._note_error(exc, refused=refused)
            finally:
                with self.cond:
                    self.dialing[i] = False

        self.t._spawn(run)

    def _note_error(self, exc: BaseException, refused: bool) -> None:
        with self.cond:
            self.last_error = exc
            if refused and not self.live():
                self.refused = True

    def submit(self, chunks: list[Chunk]) -> None:
        """Send or queue ``chunks`` (dialling link 0 first when no link is up: see
        :meth:`connect_first`)."""
        conns = self._live
        if conns is None or len(conns) != 1 or not conns[0].alive:  # (one link up: as it is)
            conns = self.live()
            if not conns:
                self.connect_first(self.t.connect_timeout)
                conns = self.live()
        if len(chunks) == 1 and chunks[0].nbytes <= _INLINE_MAX and not self.queue and conns:
            n = len(conns)
            self.rr = (self.rr + 1) % n
            for k in range(n):
                if conns[(self.rr + k) % n].send_chunk_inline(chunks[0]):
                    return
        with self.lock:  # the cond's lock (its own __enter__ is a Python call per op)
            self.queue.extend(chunks)
            self.cond.notify(len(chunks))

    def requeue(self, chunk: Chunk) -> None:
        with self.cond:
            self.queue.appendleft(chunk)
            self.cond.notify()

    def link_failed(self, conn: Conn, inflight: list[Chunk], exc: BaseException | None) -> None:
        with self.cond:
            if conn.index < len(self.conns) and self.conns[conn.index] is conn:
                self.conns[conn.index] = None
                self._live = None
            # the unacknowledged chunks go first, to whichever link is free
            self.failures += 1
            for c in reversed(inflight):
                if not c.wop.dead:
                    self.queue.appendleft(c)
                    self.requeued += 1
            if not self.live() and self.down_since is None:
                self.down_since = time.monotonic()
            self.last_error = exc
            self.cond.notify_all()
        if not self.closed:
            log.info("link %d to %s lost (%s); %d chunks requeued", conn.index, self.name, exc,
                     len(inflight))
            self._dial_later(conn.index, 0.05)

    def tick(self, now: float) -> None:
        """Called by the engine's timer: stalled links, redials, and giving up on a dead peer."""
        for c in self.live():
            if c.stalled(now, self.t.link_timeout):
                log.warning("link %d to %s made no progress for %.1f s and its path is dead "
                            "(nothing acknowledged); closing it", c.index, self.name,
                            self.t.link_timeout)
                c.fail(BrokenError("link stalled"))
        for i, slot in enumerate(self.conns):
            if slot is None and not self.dialing[i] and not self.closed:
                self._dial_later(i, 2.0 if self.refused else 0.5)
        with self.cond:
            dead = (not self.live() and self.down_since is not None
                    and (self.refused or now - self.down_since > self.t.reconnect_grace))
            if not dead:
                return
            queued = list(self.queue)
            self.queue.clear()
        err = BrokenError(f"every link to peer {self.name} is down: {self.last_error}",
                          peer=self.name)
        err.__cause__ = self.last_error
        for chunk in queued:
            chunk.wop.transfer._fail(err)
        # gone past its grace: forget it (no redials, no threads, its mappings released); a
        # later op to it starts afresh and fails at once if it is still unreachable
        self.t.forget_links(self, err)

    def close(self, error: BaseException) -> None:
        self.closed = True
        with self.cond:
            queued = list(self.queue)
            self.queue.clear()
        inflight: list[Chunk] = []
        for c in list(self.conns):
            if c is not None:
                inflight += list(c.inflight.values())
                c.links = None  # don't requeue on the way out
                c.fail(error)
        for ch in queued + inflight:
            ch.wop.transfer._fail(error)


