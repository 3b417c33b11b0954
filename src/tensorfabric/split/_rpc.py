"""Edge <-> cloud RPC over the engine's two-sided messages.

Requests travel with tag :data:`TAG_REQUEST` to the cloud, replies with :data:`TAG_REPLY`
back to the sender. A message is one JSON object (UTF-8) with an ``id`` chosen by the edge; a
call gets one reply, a stream gets ``delta`` events ending with ``done`` or ``error``. One
receiver thread on the edge demultiplexes replies by ``id``. Bulk data (layer-split hidden
states) does not go through here: it is written into a cloud region with ``Engine.write`` and
an immediate.

Every wait has a deadline: a call or a stream that hears nothing for ``timeout`` seconds raises
:class:`CloudUnavailable`, and the edge tells the cloud to cancel.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

from .._errors import ClosedError, TensorFabricError, TransferTimeout
from ._errors import CloudUnavailable

__all__ = ["TAG_REPLY", "TAG_REQUEST", "CloudClient", "decode_msg", "encode_msg"]

TAG_REQUEST = 0x7F5101
TAG_REPLY = 0x7F5102


def encode_msg(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decode_msg(data: bytes) -> dict[str, Any]:
    obj = json.loads(bytes(data).decode())
    if not isinstance(obj, dict):
        raise ValueError("RPC message is not a JSON object")
    return obj


class CloudClient:
    """The edge's handle on the cloud tier: ``call`` (one reply) and ``stream`` (events)."""

    def __init__(self, engine: Any, cloud_address: bytes) -> None:
        self.engine = engine
        self.cloud = bytes(cloud_address)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="tf-cloud-rx", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.engine.recv(tag=TAG_REPLY, timeout=0.5)
            except TransferTimeout:
                continue
            except ClosedError:
                return
            except TensorFabricError:
                continue
            try:
                obj = decode_msg(msg.data)
            except ValueError:
                continue  # a malformed reply: drop it, its caller times out
            with self._lock:
                q = self._pending.get(obj.get("id", -1))
            if q is not None:
                q.put(obj)

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
            self.engine.send(self.cloud, encode_msg(obj), tag=TAG_REQUEST, timeout=timeout).wait(
                timeout + 1.0
            )
        except TensorFabricError as exc:
            raise CloudUnavailable(f"cannot reach the cloud tier: {exc}") from exc

    def call(self, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send ``op`` and wait for its single reply."""
        rid, q = self._open()
        try:
            self._send({"id": rid, "op": op, **fields}, timeout)
            try:
                reply = q.get(timeout=timeout)
            except queue.Empty:
                raise CloudUnavailable(
                    f"the cloud tier did not answer {op!r} within {timeout:.1f} s"
                ) from None
        finally:
            self._close(rid)
        if reply.get("event") == "error":
            raise CloudUnavailable(f"the cloud tier failed {op!r}: {reply.get('message')}")
        return reply

    def stream(self, op: str, timeout: float, **fields: Any) -> Iterator[dict[str, Any]]:
        """Send ``op`` and yield its events until ``done``. ``timeout`` bounds each gap between
        events; on a gap, an error or an abandoned iterator the cloud is told to cancel."""
        rid, q = self._open()
        finished = False
        try:
            self._send({"id": rid, "op": op, **fields}, timeout)
            while True:
                try:
                    ev = q.get(timeout=timeout)
                except queue.Empty:
                    raise CloudUnavailable(
                        f"the cloud tier sent nothing for {timeout:.1f} s during {op!r}"
                    ) from None
                kind = ev.get("event")
                if kind == "error":
                    finished = True
                    raise CloudUnavailable(f"the cloud tier failed {op!r}: {ev.get('message')}")
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
            return self.call("ping", timeout).get("event") == "pong"
        except CloudUnavailable:
            return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
