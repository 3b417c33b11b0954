"""The engine's timer: operation deadlines and the transports' housekeeping, one thread."""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ._errors import ConfigError, TransferTimeout
from ._transfer import Transfer

if TYPE_CHECKING:
    from .transports._poller import Blocker
    from .transports._tcp import TcpTransport

log = logging.getLogger("tensorfabric")


class Timers:
    """Mixin of :class:`~._engine.Engine`: deadlines of pending transfers (weakly held, so
    finished ones are freed when the caller drops them) and a 0.1 s housekeeping tick."""

    timeout: float
    _closed: bool
    _tcp: TcpTransport
    _blocker: Blocker | None  # the tcp poller's, if any
    _timers: list[tuple[float, int, weakref.ref[Transfer]]]
    #: deadlines of new transfers, appended without a lock (one deque append per op); the
    #: timer thread moves them into the heap
    _timers_new: collections.deque[tuple[float, weakref.ref[Transfer]]]
    _timer_seq: itertools.count[int]
    _timer_cv: threading.Condition
    _timer_lock: threading.Lock  # _timer_cv's lock

    if TYPE_CHECKING:  # provided by Inbound
        def _sweep_partial(self, now: float) -> None: ...

    def _new_transfer(self, kind: str, nbytes: int, parts: int, timeout: float | None,
                      peer: str | None) -> Transfer:
        limit = self.timeout if timeout is None else float(timeout)
        if limit <= 0:
            raise ConfigError(f"timeout must be > 0, got {timeout!r}")
        deadline = time.monotonic() + limit
        t = Transfer(kind, nbytes, parts=parts, peer=peer, deadline=deadline)
        # a waiter blocking on it ends a hold on the links (transports/_poller.py); ops whose
        # waiter may read its reply itself set their link or the poller instead
        t._reader = self._blocker
        if parts:
            self._timers_new.append((deadline, weakref.ref(t)))
        return t

    def _take_new_timers(self) -> None:
        """Move new transfers' deadlines into the heap (``_timer_lock`` held)."""
        new, heap, seq = self._timers_new, self._timers, self._timer_seq
        while new:
            deadline, ref = new.popleft()
            t = ref()
            if t is not None and not t._done:  # (most small ops finished already)
                heapq.heappush(heap, (deadline, next(seq), ref))


    def _timer_loop(self) -> None:
        next_tick = 0.0
        while not self._closed:
            now = time.monotonic()
            expired: list[Transfer] = []
            with self._timer_cv:
                self._take_new_timers()
                while self._timers:
                    deadline, _, ref = self._timers[0]
                    top = ref()
                    if top is not None and not top.done() and deadline > now:
                        break
                    heapq.heappop(self._timers)
                    if top is not None and not top.done():
                        expired.append(top)
                if len(self._timers) > 4096:  # drop finished entries buried under live ones
                    live = [e for e in self._timers if (x := e[2]()) is not None and not x.done()]
                    if len(live) < len(self._timers) // 2:
                        heapq.heapify(live)
                        self._timers = live
                wait = 0.05
                if self._timers:
                    wait = min(wait, max(0.0, self._timers[0][0] - now))
            for t in expired:
                t._fail(TransferTimeout(f"{t.kind} did not complete within its timeout",
                                        peer=t.peer, nbytes=t.nbytes))
            if now >= next_tick:
                next_tick = now + 0.1
                try:
                    self._tcp.tick(now)
                except Exception:
                    log.exception("tensorfabric: link housekeeping failed")
                self._sweep_partial(now)
            with self._timer_cv:
                if not self._closed:
                    self._timer_cv.wait(wait)


