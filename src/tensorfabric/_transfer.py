"""The handle every operation returns."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Generator

from ._errors import CancelledError, TensorFabricError, TransferTimeout

log = logging.getLogger("tensorfabric")


class Transfer:
    """A handle on one logical operation (a write, a read, a scatter, an expect, ...).

    It completes when every part of the operation has completed, or fails with the first error.
    Thread-safe. Awaitable from asyncio (``await transfer``).
    """

    __slots__ = (
        "kind", "nbytes", "peer", "deadline", "_lock", "_gate", "_done", "_claimed", "_error",
        "_callbacks", "_pending", "_cancel_hooks", "value", "started", "finished", "_reader",
        "__weakref__",
    )

    def __init__(self, kind: str, nbytes: int = 0, *, parts: int = 1, peer: str | None = None,
                 deadline: float | None = None) -> None:
        self.kind = kind
        self.nbytes = nbytes
        self.peer = peer
        self.deadline = deadline  # time.monotonic() value, or None
        self._lock = threading.Lock()
        # held until the transfer finishes: a waiter blocks on it, then passes it on. One
        # futex wake per waiter, cheaper than threading.Event's condition (7 us vs 11-20 us a hop)
        self._gate = threading.Lock()
        self._gate.acquire()
        self._done = False  # finished, and its abort hooks have run: waiters may go
        self._claimed = False  # a _finish call has won (set before the abort hooks run)
        self._error: BaseException | None = None
        # () until the first one comes: most transfers never get one (no list per op)
        self._callbacks: list[Callable[[Transfer], Any]] | tuple[()] = ()
        self._cancel_hooks: list[Callable[[], Any]] | tuple[()] = ()
        self._pending = parts
        self.value: Any = None  #: what the op produced (e.g. the ``Message`` of a recv)
        self.started = time.perf_counter()
        self.finished: float | None = None
        #: the link that will carry this transfer's only reply, when its waiter may read it
        #: itself (``read_for(transfer, timeout)``) instead of being woken by a receive thread
        self._reader: Any = None
        if parts == 0:
            self._finish(None)

    # -- completion, called by the engine and transports ---------------------------------

    def _add_parts(self, n: int) -> None:
        with self._lock:
            self._pending += n

    def _part_done(self) -> None:
        with self._lock:
            if self._claimed:
                return
            self._pending -= 1
            if self._pending > 0:
                return
            # the last part: finish here, under the same lock (what _finish(None) does)
            self._claimed = True
            self.finished = time.perf_counter()
            self._cancel_hooks = ()
            reader, callbacks = self._let_go()
        if reader is not None or callbacks:
            self._after_let_go(reader, callbacks)

    def _complete(self, value: Any = None) -> bool:
        """Finish successfully with ``value`` unless already finished (e.g. timed out)."""
        with self._lock:
            if self._claimed:
                return False
            self.value = value
        return self._finish(None)

    def _fail(self, error: BaseException) -> bool:
        """Fail the transfer unless it already finished. Returns True if this call failed it."""
        return self._finish(error)

    def _finish(self, error: BaseException | None) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            self._error = error
            self.finished = time.perf_counter()
            hooks, self._cancel_hooks = self._cancel_hooks, ()
            if error is None:  # no hooks to run: let the waiters go under this same lock
                reader, callbacks = self._let_go()
        if error is not None:
            # the abort hooks (give back what an expect consumed, drop queued parts) run before
            # any waiter is let go: one that catches the error sees their work done
            for hook in hooks:
                _run_quietly(hook)
            with self._lock:
                reader, callbacks = self._let_go()
        self._after_let_go(reader, callbacks)
        return True

    def _after_let_go(self, reader: Any, callbacks: list[Callable[[Transfer], Any]] | tuple[()]) -> None:
        """Outside the lock, once the waiters are let go: wake a polling reader, run callbacks."""
        if reader is not None:
            reader.kick()  # its waiter may be polling for it in another thread
        for cb in callbacks:
            _run_quietly(cb, self)

    def _let_go(self) -> tuple[Any, list[Callable[[Transfer], Any]] | tuple[()]]:
        """Mark done and open the gate (under ``_lock``); the reader to kick, the callbacks."""
        self._done = True
        reader, self._reader = self._reader, None
        self._gate.release()
        callbacks, self._callbacks = self._callbacks, ()
        return reader, callbacks

    def _on_abort(self, hook: Callable[[], Any]) -> None:
        """Run ``hook`` if this transfer fails or is cancelled (to drop queued work)."""
        with self._lock:
            if not self._claimed:
                if isinstance(self._cancel_hooks, list):
                    self._cancel_hooks.append(hook)
                else:
                    self._cancel_hooks = [hook]
                return
        if self._error is not None:
            _run_quietly(hook)

    # -- public ---------------------------------------------------------------------------

    def done(self) -> bool:
        """True once the transfer has completed, failed or been cancelled."""
        return self._done

    def wait(self, timeout: float | None = None) -> Transfer:
        """Block until done; raise the operation's error if it failed.

        ``timeout`` bounds this wait (seconds); the operation's own deadline still applies.
        Raises :class:`TransferTimeout` if the wait ran out (the operation goes on).
        """
        if timeout is None and self.deadline is not None:
            # never block past the op's own deadline (plus slack for the engine's timer)
            timeout = max(0.0, self.deadline - time.monotonic()) + 5.0
        reader = self._reader
        left = timeout
        if reader is not None and not self._done:
            t0 = time.monotonic()
            reader.read_for(self, 3600.0 if timeout is None else timeout)
            if timeout is not None:
                left = timeout - (time.monotonic() - t0)
        if not self._done:
            limit = -1 if left is None else min(max(0.0, left), threading.TIMEOUT_MAX)
            if not self._gate.acquire(timeout=limit):
                raise TransferTimeout(
                    f"{self.kind} not done after {timeout:.3g} s", peer=self.peer,
                    nbytes=self.nbytes)
            self._gate.release()  # let the next waiter through
        if self._error is not None:
            raise self._error
        return self

    def result(self, timeout: float | None = None) -> Any:
        """Wait, then return the operation's value (a ``Message`` for recv, else None)."""
        self.wait(timeout)
        return self.value

    def exception(self) -> BaseException | None:
        return self._error if self._done else None

    def cancel(self) -> bool:
        """Cancel the operation. Returns False if it had already finished.

        Parts not yet sent are dropped; bytes already on the wire may still land at the peer.
        """
        return self._finish(CancelledError(f"{self.kind} was cancelled", peer=self.peer))

    def cancelled(self) -> bool:
        return isinstance(self.exception(), CancelledError)

    def add_done_callback(self, fn: Callable[[Transfer], Any]) -> None:
        """Call ``fn(transfer)`` when done (at once if already done), from the completing thread."""
        with self._lock:
            if not self._done:
                if isinstance(self._callbacks, list):
                    self._callbacks.append(fn)
                else:
                    self._callbacks = [fn]
                return
        _run_quietly(fn, self)

    @property
    def elapsed(self) -> float | None:
        """Seconds from submission to completion, once done."""
        return None if self.finished is None else self.finished - self.started

    def __await__(self) -> Generator[Any, None, Transfer]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        def wake(_: Transfer) -> None:
            loop.call_soon_threadsafe(resolve)

        self.add_done_callback(wake)
        yield from fut.__await__()
        return self.wait(0)

    def __repr__(self) -> str:
        state = "pending"
        if self.done():
            state = "ok" if self._error is None else f"failed: {type(self._error).__name__}"
        return f"<Transfer {self.kind} {self.nbytes} bytes {state}>"


def _run_quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a user callback must not kill an engine thread
        log.exception("tensorfabric: callback %r raised", fn)


def gather(transfers: list[Transfer], kind: str = "group") -> Transfer:
    """One transfer that completes when all of ``transfers`` have (fails on the first error)."""
    group = Transfer(kind, sum(t.nbytes for t in transfers), parts=len(transfers))
    # its waiter blocks: like its parts' own waiters that cannot read for them (a hold on
    # the links ends first; see transports/_poller.py)
    group._reader = next((b for b in (getattr(t._reader, "blocker", None) for t in transfers)
                          if b is not None), None)

    def one_done(t: Transfer) -> None:
        err = t.exception()
        if err is not None:
            group._fail(err)
        else:
            group._part_done()

    for t in transfers:
        t.add_done_callback(one_done)
    group._on_abort(lambda: [t.cancel() for t in transfers])
    return group


__all__ = ["Transfer", "gather", "TensorFabricError"]
