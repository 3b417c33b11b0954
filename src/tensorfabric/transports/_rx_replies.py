"""TCP receive path, dialler side: the replies to this engine's own operations (a mixin of
:class:`~._rx.Receiver`): acknowledgements one at a time or in ACKS batches, read responses,
shared-memory grants and revocations."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from .. import _wire as w
from .._address import EngineAddress
from .._errors import ProtocolError
from .._ops import Chunk

if TYPE_CHECKING:
    from ._tcp import TcpTransport

_SMALL_WINDOW = 64  # = _link.SMALL_WINDOW (small chunks in flight per link)


class ReplyReceiver:
    """The dialled link's frame handlers (it uses the link's state; see ``Receiver``)."""

    t: TcpTransport
    peer: EngineAddress
    cond: threading.Condition
    lock: threading.RLock  # cond's lock
    inflight: dict[tuple[int, int], Chunk]

    if TYPE_CHECKING:  # provided by Receiver
        def _drain(self, n: int) -> None: ...
        def _end_payload(self) -> None: ...
        def _recv_into(self, view: memoryview) -> None: ...
        def _defer(self, frame: bytes | tuple[int, int]) -> None: ...

    def _dialer_handlers(self) -> dict[int, Callable[..., None]]:
        return {
            w.Op.ACK: self._on_reply,
            w.Op.SHM_OPEN_RESP: self._on_shm_open_resp,
            w.Op.READ_RESP: self._on_read_resp,
            w.Op.PONG: lambda *a: None,
            w.Op.SHM_REVOKE: self._on_shm_revoke,
        }

    def _pop_inflight(self, op_id: int, chunk: int) -> Chunk | None:
        with self.lock:
            c = self.inflight.pop((op_id, chunk), None)
            if c is not None and len(self.inflight) in (self.t.window - 1, _SMALL_WINDOW - 1):
                self.cond.notify_all()  # this link's writer may take the next chunk
            return c

    def _on_reply(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                  chunk: int, nchunks: int) -> None:
        if plen:  # (an acknowledgement carries none)
            self._drain(plen)
            self._end_payload()
        c = self._pop_inflight(op_id, chunk)
        if c is not None:
            c.wop.chunk_replied(flags, ext.decode(errors="replace"), c.region)

    def _on_acks(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                 chunk: int, nchunks: int) -> None:
        """Several OK acknowledgements in one frame: their chunks are popped under one lock."""
        if plen or flags or not ext or len(ext) % w.ACK_ENTRY.size:
            raise ProtocolError("malformed acknowledgement batch")
        done = []
        with self.lock:
            inflight = self.inflight
            before = len(inflight)
            for key in w.ACK_ENTRY.iter_unpack(ext):
                c = inflight.pop(key, None)
                if c is not None:
                    done.append(c)
            after = len(inflight)
            if after < self.t.window <= before or after < _SMALL_WINDOW <= before:
                self.cond.notify_all()  # this link's writer may take the next chunks
        for c in done:
            wop = c.wop
            if wop._lock is None and wop.on_done is None:  # one chunk (a small op): finished
                wop.remaining = 0
                wop.transfer._part_done()
            else:
                wop.chunk_replied(w.Status.OK, "", c.region)

    def _on_shm_open_resp(self, flags: int, ext: bytes, op_id: int, region: int, plen: int,
                          imm: int, chunk: int, nchunks: int) -> None:
        if plen:
            raise ProtocolError("a shared-memory grant carries no payload")
        c = self._pop_inflight(op_id, chunk)
        if c is None:
            return
        if flags == w.Status.OK:
            c.wop.transfer.value = ext  # the grant: ticket, size, the owner's socket
            c.wop.chunk_replied(w.Status.OK, "", c.region)
        else:
            c.wop.chunk_replied(flags, ext.decode(errors="replace"), c.region)

    def _on_shm_revoke(self, flags: int, ext: bytes, op_id: int, region: int, plen: int,
                       *_: int) -> None:
        if plen or ext:
            raise ProtocolError("malformed shared-memory revocation")
        if self.t.on_shm_revoke is not None:
            self.t.on_shm_revoke(self.peer.engine_id, region)
        self._defer(w.pack_header(w.Op.SHM_REVOKED, 0, 0, op_id, region))

    def _on_read_resp(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                      chunk: int, nchunks: int) -> None:
        with self.cond:  # popped only once the payload checked out (else it is resent)
            c = self.inflight.get((op_id, chunk))
        if c is None or c.dst is None or flags != w.Status.OK:
            self._drain(plen)
            self._end_payload()
            c = self._pop_inflight(op_id, chunk)
            if c is not None:
                c.wop.chunk_replied(flags or w.Status.ERROR, ext.decode(errors="replace"),
                                    c.region)
            return
        if plen != c.dst.nbytes:
            raise ProtocolError(f"read response of {plen} bytes for a {c.dst.nbytes}-byte request")
        if not c.wop.dead:
            self._recv_into(c.dst)
        else:
            self._drain(plen)
        self._end_payload()
        if self._pop_inflight(op_id, chunk) is not None:
            c.wop.chunk_replied(w.Status.OK, "", c.region)

