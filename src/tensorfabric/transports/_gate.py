"""Limits on connections that have not authenticated yet.

Before a peer proves the cluster secret it may cost us little: a bounded number of
connections (per source address and in all), each for at most one handshake deadline (a
connection trickling one byte at a time is cut off when the deadline passes, whatever it
sends), and sources that keep failing the secret check wait longer and longer for each answer.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time

log = logging.getLogger("tensorfabric.tcp")

PER_SOURCE = 16
TOTAL = 128
_FAIL_WINDOW = 30.0  # failures older than this are forgotten
_FAIL_FREE = 3  # failures per window answered at once; after that each waits longer
_MAX_DELAY = 2.0
_MAX_SOURCES = 4096


class PreAuthGate:
    """Admission, deadlines and failure back-off for incoming handshakes."""

    def __init__(self, deadline: float, per_source: int = PER_SOURCE, total: int = TOTAL) -> None:
        self.deadline = deadline
        self.per_source = per_source
        self.total = total
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, float, socket.socket]] = {}  # id -> src, deadline, dup
        self._per: collections.Counter[str] = collections.Counter()
        self._fails: collections.OrderedDict[str, collections.deque[float]] = \
            collections.OrderedDict()
        self.refused = 0  # connections turned away by the caps (for tests and logs)

    def admit(self, sock: socket.socket, src: str) -> float | None:
        """Count a new connection in; its handshake deadline, or None if over a cap."""
        with self._lock:
            if len(self._pending) >= self.total or self._per[src] >= self.per_source:
                self.refused += 1
                return None
            try:
                # a duplicate of the connection, so that a handshake past its deadline can be
                # cut off (shutdown) from the timer even while TLS holds the original
                dup = sock.dup()
            except OSError:
                self.refused += 1
                return None
            deadline = time.monotonic() + self.deadline
            self._pending[id(sock)] = (src, deadline, dup)
            self._per[src] += 1
            return deadline

    def done(self, sock: socket.socket) -> None:
        """The handshake ended (either way): no longer counted."""
        with self._lock:
            entry = self._pending.pop(id(sock), None)
            if entry is None:
                return
            src, _, dup = entry
            self._per[src] -= 1
            if self._per[src] <= 0:
                del self._per[src]
        dup.close()

    def failed(self, src: str) -> float:
        """A source failed the secret check; returns how long to hold its answer."""
        now = time.monotonic()
        with self._lock:
            q = self._fails.get(src)
            if q is None:
                q = self._fails[src] = collections.deque(maxlen=64)
                while len(self._fails) > _MAX_SOURCES:
                    self._fails.popitem(last=False)
            while q and now - q[0] > _FAIL_WINDOW:
                q.popleft()
            q.append(now)
            over = len(q) - _FAIL_FREE
        return 0.0 if over <= 0 else min(_MAX_DELAY, 0.05 * 2 ** min(over, 10))

    def reap(self, now: float) -> None:
        """Cut off every handshake past its deadline (called by the engine's timer)."""
        with self._lock:
            late = [dup for _, deadline, dup in self._pending.values() if deadline < now]
            for dup in late:
                try:
                    dup.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        with self._lock:
            dups = [dup for _, _, dup in self._pending.values()]
        for dup in dups:
            try:
                dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


__all__ = ["PreAuthGate"]
