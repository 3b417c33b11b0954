"""Edge <-> cloud RPC over the engine's two-sided messages.

Requests travel with tag :data:`TAG_REQUEST` to the cloud, replies with :data:`TAG_REPLY`
back to the sender. A message is one JSON object (UTF-8) with an ``id`` chosen by the edge; a
call gets one reply, a stream gets ``delta`` events ending with ``done`` or ``error``. One
receiver thread on the edge demultiplexes replies by ``id``. Bulk data (layer-split hidden
states) does not go through here: it is written into a cloud region with ``Engine.write`` and
an immediate.

Busy is not down: while a request waits in the cloud's queue or runs, the cloud sends an
``alive`` event naming it every ``cloud.keepalive`` seconds. A stream that hears nothing about
its request for ``dead_after`` seconds raises :class:`CloudUnavailable` (the cloud is gone); one
that is kept alive waits up to its overall deadline, then raises :class:`Overloaded`. An
``error`` reply says whose fault it was: ``request`` (:class:`CloudRequestError`, the client's),
``busy`` (:class:`Overloaded`) or anything else (:class:`CloudFailed`: the cloud is alive).
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._address import EngineAddress
from .._errors import ClosedError, TensorFabricError, TransferTimeout
from ._errors import CloudFailed, CloudRequestError, CloudUnavailable, Overloaded

__all__ = ["TAG_JOIN", "TAG_REPLY", "TAG_REQUEST", "CloudClient", "decode_msg", "encode_msg"]

TAG_REQUEST = 0x7F5101
TAG_REPLY = 0x7F5102
TAG_JOIN = 0x7F5103  # a (re)started cloud announces itself to an edge


def encode_msg(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decode_msg(data: bytes) -> dict[str, Any]:
    obj = json.loads(bytes(data).decode())
    if not isinstance(obj, dict):
        raise ValueError("RPC message is not a JSON object")
    return obj


def raise_for_error(op: str, reply: dict[str, Any]) -> None:
    if reply.get("event") != "error":
        return
    kind, message = reply.get("kind"), reply.get("message")
    if kind == "request":
        raise CloudRequestError(f"the cloud tier refused {op!r}: {message}")
    if kind == "busy":
        raise Overloaded(f"the cloud tier is busy: {message}")
    raise CloudFailed(f"the cloud tier failed {op!r}: {message}")


class CloudClient:
    """The edge's handle on the cloud tier: ``call`` (one reply) and ``stream`` (events)."""

    def __init__(self, engine: Any, cloud_address: bytes, *, dead_after: float = 1.5) -> None:
        self.engine = engine
        self.cloud = cloud_address
        self.dead_after = dead_after
        self.last_heard = 0.0  # monotonic time of the last message from the cloud
        # when the receive thread last found nothing more from the cloud: silence is known up
        # to here, not up to "now" (a starved edge process has not looked since)
        self.looked = time.monotonic()
        self.last_pong: dict[str, Any] = {}  # the cloud's last pong (engine, load, batch stats)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="tf-cloud-rx", daemon=True)
        self._thread.start()

    @property
    def cloud(self) -> bytes:
        """The cloud tier's engine address; set it to follow a restarted cloud."""
        return self._cloud

    @cloud.setter
    def cloud(self, address: bytes) -> None:
        self._cloud = bytes(address)
        self._cloud_id = EngineAddress.from_bytes(self._cloud).engine_id

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.engine.recv(tag=TAG_REPLY, timeout=0.5)
            except TransferTimeout:
                self.looked = time.monotonic()
                continue
            except ClosedError:
                return
            except TensorFabricError:
                continue
            try:
                obj = decode_msg(msg.data)
            except ValueError:
                continue  # a malformed reply: drop it, its caller times out
            if EngineAddress.from_bytes(msg.peer).engine_id != self._cloud_id:
                continue  # a cloud we left (restarted): its late replies are not ours
            self.last_heard = self.looked = time.monotonic()
            ids = obj.get("ids") if obj.get("event") == "alive" else [obj.get("id", -1)]
            if "stats" in obj and obj.get("event") == "alive":
                self.last_pong = {**self.last_pong, "stats": obj["stats"], "load": obj.get("load", 0),
                                  "slots": obj.get("slots", 1)}
            with self._lock:
                queues = [self._pending.get(i) for i in ids or ()]
            for q in queues:
                if q is not None:
                    q.put(obj)

    def heard_within(self, seconds: float) -> bool:
        return time.monotonic() - self.last_heard < seconds

    def _open(self) -> tuple[int, queue.Queue[dict[str, Any]]]:
        rid = next(self._ids)
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._pending[rid] = q
        return rid, q

    def _close(self, rid: int) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    def _send(self, obj: dict[str, Any], timeout: float) -> None:
        try:
            self.engine.send(self.cloud, encode_msg(obj), tag=TAG_REQUEST, timeout=timeout).wait(timeout)
        except TensorFabricError as exc:
            raise CloudUnavailable(f"cannot reach the cloud tier: {exc}") from exc

    def _next(self, q: queue.Queue[dict[str, Any]], op: str, deadline: float) -> dict[str, Any]:
        """The next real event for a request; ``alive`` events only reset the silence timer."""
        heard = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise Overloaded(f"the cloud tier is alive but did not finish {op!r} in time")
            # Dead = the whole cloud silent (no keep-alive, pong or token for anyone): a busy
            # cloud that is slow to name this request is still alive. Silence counts up to the
            # receive thread's last look, so an edge process the machine starved (neither
            # thread ran) does not take the cloud's keep-alives still in its socket for silence.
            if min(now, self.looked) - max(heard, self.last_heard) >= self.dead_after:
                raise CloudUnavailable(
                    f"the cloud tier went silent for {self.dead_after:.1f} s during {op!r} "
                    "(process or connection gone)"
                )
            try:
                ev = q.get(timeout=min(0.2, deadline - now))
            except queue.Empty:
                continue
            heard = time.monotonic()
            if ev.get("event") != "alive":
                return ev

    def call(self, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send ``op`` and wait for its single reply (at most ``timeout`` seconds)."""
        rid, q = self._open()
        try:
            self._send({"id": rid, "op": op, **fields}, timeout)
            try:
                reply = self._next(q, op, time.monotonic() + timeout)
            except Overloaded:
                raise CloudUnavailable(f"the cloud tier did not answer {op!r} within {timeout:.1f} s") from None
        finally:
            self._close(rid)
        raise_for_error(op, reply)
        return reply

    def stream(self, op: str, timeout: float, **fields: Any) -> Iterator[dict[str, Any]]:
        """Send ``op`` and yield its events until ``done``. ``timeout`` bounds the whole stream
        while the cloud keeps it alive; silence for ``dead_after`` means the cloud is gone. On
        an error or an abandoned iterator the cloud is told to cancel."""
        rid, q = self._open()
        finished = False
        deadline = time.monotonic() + timeout
        try:
            self._send({"id": rid, "op": op, **fields}, min(timeout, 10.0))
            while True:
                ev = self._next(q, op, deadline)
                kind = ev.get("event")
                if kind == "error":
                    finished = True
                    raise_for_error(op, ev)
                if kind == "done":
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            self._close(rid)
            if not finished:
                self.cancel(rid)

    def cancel(self, rid: int) -> None:
        """Best effort: tell the cloud to stop work for ``rid`` (no reply expected)."""
        try:
            self.engine.send(
                self.cloud, encode_msg({"id": 0, "op": "cancel", "target": rid}), tag=TAG_REQUEST,
                timeout=2.0,
            )
        except TensorFabricError:
            pass

    def ping(self, timeout: float) -> bool:
        try:
            reply = self.call("ping", timeout)
            if reply.get("event") == "pong":
                self.last_pong = reply
                return True
            return False
        except (CloudUnavailable, Overloaded, CloudRequestError):
            return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
