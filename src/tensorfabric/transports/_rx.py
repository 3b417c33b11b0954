"""TCP receive path: a link's receive loop and the handlers of each frame type.

Acceptor side: a peer's operations on our memory (checked by the engine before a byte lands).
Dialer side: the replies to our operations. Payloads are received straight into place.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import _wire as w
from .._address import EngineAddress
from .._errors import ProtocolError
from .._ops import Chunk
from .._region import Access
from ._handshake import IOV_MAX, _PeerGone
from ._integrity import TAG, FrameMac
from ._rx_replies import ReplyReceiver

if TYPE_CHECKING:
    from ._tcp import TcpTransport

log = logging.getLogger("tensorfabric.tcp")

RBUF = 64 << 10  #: a link's read-ahead buffer
_DIRECT = 16 << 10  #: pieces from this size are received straight into place, not via RBUF
_MAX_DEFERRED = 64  #: acknowledgements held back at most, waiting to go out together
_OP_ONE_SEG = struct.Struct("<16sQQQ")  # OP_HEAD and one segment (offset, length)
_ONE_SEG_EXT = _OP_ONE_SEG.size
_TAKE_MIN = w.HEADER_SIZE + _ONE_SEG_EXT  # a buffered frame the compiled loop may take
_HEADER = w.HEADER
_REMOTE_WRITE = int(Access.REMOTE_WRITE)
_PAYLOAD_MAC_FAILED = ("a frame's payload failed its integrity check (changed on the way, or "
                       "a relay without the secret)")
_HEAD_SIZE = w.HEADER_SIZE


def _acks_frame(run: list[tuple[int, int]]) -> bytes:
    """One frame acknowledging every (op id, chunk) of ``run`` (status OK)."""
    if len(run) == 1:
        op_id, chunk = run[0]
        return _HEADER.pack(w.MAGIC, w.Op.ACK, 0, 0, op_id, 0, 0, 0, chunk, chunk + 1)
    ext = b"".join([w.ACK_ENTRY.pack(op_id, chunk) for op_id, chunk in run])
    return w.pack_header(w.Op.ACKS, 0, len(ext)) + ext


class Receiver(ReplyReceiver):
    """The receive half of :class:`~._link.Conn` (a mixin: it uses the link's state); the
    dialled side's reply handlers are in :class:`~._rx_replies.ReplyReceiver`."""

    t: TcpTransport
    sock: socket.socket
    dialer: bool
    peer: EngineAddress
    peer_name: str
    peer_key: bytes  # the peer's address bytes (what its messages' ``peer`` field holds)
    index: int
    tls: bool
    cond: threading.Condition
    lock: threading.RLock  # cond's lock
    replies: collections.deque[list[Any]]
    inflight: dict[tuple[int, int], Chunk]
    last_rx: float
    rx: FrameMac | None
    _pmac: Any
    _rbv: memoryview  # the read-ahead buffer; bytes [_rs, _re) are received, not yet parsed
    _rs: int
    _re: int
    _deferred: list[bytes | tuple[int, int]]
    batch_acks: bool  # OK acknowledgements go out as ACKS frames (the dialer agreed)
    _take: Any  # _native.take_writes where this link may use it (see Conn), else None
    _targets: dict[int, Any]  # the engine's regions by id, for _take
    _take_mac: Any  # rx.native_parts() for _take on a link with frame MACs, else None
    _rx_head: Any  # rx.head, or the same from C (see Conn)
    _header: bytearray  # the frame header being received, and a view of it
    _hview: memoryview
    _handlers: dict[int, Callable[..., None]]

    if TYPE_CHECKING:  # provided by Conn
        def fail(self, exc: BaseException | None = None) -> None: ...
        def reply(self, frame: list[Any]) -> None: ...
        def _try_send_nowait(self, frames: list[bytes]) -> bool: ...
        def _queue_replies(self, frames: list[list[Any]]) -> None: ...


    def _recv_into(self, view: memoryview) -> None:
        self._recv_plain(view)
        if self._pmac is not None:
            self._pmac.update(view)

    def _recv_plain(self, view: memoryview) -> None:
        """Fill ``view``: first from what the read-ahead buffer holds, then straight from the
        socket (large pieces) or through the buffer (small ones: one recv takes the headers
        and payloads of many small frames, instead of three or four recvs per frame)."""
        rs, re_ = self._rs, self._re
        if rs < re_:
            k = min(re_ - rs, view.nbytes)
            view[:k] = self._rbv[rs:rs + k]
            self._rs = rs + k
            if k == view.nbytes:
                return
            view = view[k:]
        if self._deferred:
            self._flush_deferred()  # about to block: acknowledge what has landed first
        sock = self.sock
        while view.nbytes >= _DIRECT:
            n = sock.recv_into(view)
            if n == 0:
                raise _PeerGone("peer closed the connection")
            self.last_rx = time.monotonic()
            view = view[n:]
        while view:
            n = sock.recv_into(self._rbv)
            if n == 0:
                raise _PeerGone("peer closed the connection")
            self.last_rx = time.monotonic()
            k = min(n, view.nbytes)
            view[:k] = self._rbv[:k]
            self._rs, self._re = k, n
            view = view[k:]

    def _fill(self) -> None:
        """Read what the socket has into the (empty) read-ahead buffer; acknowledge what has
        landed first, as this may block."""
        if self._deferred:
            self._flush_deferred()
        n = self.sock.recv_into(self._rbv)
        if n == 0:
            raise _PeerGone("peer closed the connection")
        self.last_rx = time.monotonic()
        self._rs, self._re = 0, n

    def _defer(self, frame: bytes | tuple[int, int]) -> None:
        """Queue a small reply (an acknowledgement) from the receive thread; it goes out with
        the others in one send when the read-ahead buffer runs dry (before this thread would
        block), so a burst of small frames costs one acknowledging send, not one each. An
        ``(op_id, chunk)`` pair is an OK acknowledgement: pairs in a row go out as one ACKS
        frame (one header, one MAC) where the link agreed on it."""
        self._deferred.append(frame)
        if len(self._deferred) >= _MAX_DEFERRED:
            self._flush_deferred()

    def _pack_deferred(self) -> list[bytes]:
        """Take the deferred replies as frames: each run of OK acknowledgements one ACKS
        frame (a run of one: a plain ACK)."""
        items, self._deferred = self._deferred, []
        if len(items) == 1:  # a round trip's one reply: no runs to look for
            item = items[0]
            return [_acks_frame([item]) if isinstance(item, tuple) else item]
        frames: list[bytes] = []
        run: list[tuple[int, int]] = []
        for item in items:
            if isinstance(item, tuple):
                run.append(item)
                continue
            if run:
                frames.append(_acks_frame(run))
                run = []
            frames.append(item)
        if run:
            frames.append(_acks_frame(run))
        return frames

    def _flush_deferred(self) -> None:
        """Send the deferred replies: in one send when the socket takes them, else through
        the link's writer."""
        frames = self._pack_deferred()
        if frames and not self._try_send_nowait(frames):
            self._queue_replies([[f] for f in frames])

    def _mac_update(self, view: memoryview) -> None:
        self._pmac.update(view)

    def _recv_many(self, views: list[memoryview]) -> None:
        if self.tls or len(views) == 1:
            for v in views:
                self._recv_into(v)
            return
        whole = list(views) if self._pmac is not None else None
        views = list(views)
        i = 0
        while i < len(views) and self._rs < self._re:  # what the read-ahead already holds
            v = views[i]
            k = min(self._re - self._rs, v.nbytes)
            v[:k] = self._rbv[self._rs:self._rs + k]
            self._rs += k
            if k == v.nbytes:
                i += 1
            else:
                views[i] = v[k:]
        if i < len(views) and sum(v.nbytes for v in views[i:]) < _DIRECT:
            for v in views[i:]:  # small: through the read-ahead buffer
                self._recv_plain(v)
            i = len(views)
        if i < len(views) and self._deferred:
            self._flush_deferred()
        sock = self.sock
        while i < len(views):
            n = sock.recvmsg_into(views[i:i + IOV_MAX])[0]
            if n == 0:
                raise _PeerGone("peer closed the connection")
            self.last_rx = time.monotonic()
            while i < len(views) and n >= len(views[i]):
                n -= len(views[i])
                i += 1
            if n:
                views[i] = views[i][n:]
        if whole is not None:
            for v in whole:
                self._mac_update(v)

    def _drain(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            k = min(n, len(scratch))
            self._recv_plain(scratch[:k])  # the scratch is reused: hash it before the next
            if self._pmac is not None:
                self._mac_update(scratch[:k])
            n -= k

    def _end_payload(self) -> None:
        """The payload is in: check its MAC before anything acts on it (ack, count, deliver)."""
        mac = self._pmac
        if mac is None:
            return
        self._pmac = None
        tag = bytearray(TAG)
        self._recv_into(memoryview(tag))
        if not FrameMac.same(mac.finalize(), tag):
            raise ProtocolError(_PAYLOAD_MAC_FAILED)

    def _recv_loop(self) -> None:
        """The link's receive thread: frames as they come (see ``Conn._poll_loop`` for the
        dialled links whose callers may read their own replies)."""
        self._guarded(self._frames_forever)

    def _frames_forever(self) -> None:
        while True:
            self._frame()

    def _guarded(self, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` (which reads frames); a failure closes the link. False if it failed."""
        try:
            fn()
            return True
        except ProtocolError as exc:
            log.warning("closing link %d with %s: %s", self.index, self.peer_name, exc)
            self.fail(exc)
        except _PeerGone as exc:
            self.fail(exc)
        except (OSError, ValueError) as exc:
            self.fail(exc)
        except Exception as exc:  # a bug must not leave a half-dead link behind
            log.exception("link %d with %s: unexpected error", self.index, self.peer_name)
            self.fail(exc)
        return False

    def _frame(self) -> None:
        """Receive one frame and act on it (its MAC checked first), or, on an owner's link,
        every buffered small write the compiled loop takes (see _native_rx.c)."""
        rs = self._rs
        take = self._take
        if take is not None and rs == self._re:  # nothing buffered: read ahead, then look
            self._fill()
            rs = 0
        if take is not None and self._re - rs > _TAKE_MIN:
            deferred = self._deferred
            end = take(self._rbv, rs, self._re, self._targets, deferred,
                       _MAX_DEFERRED - len(deferred), self._take_mac)
            if end != rs:  # it took some: the caller reads on (the next may be for Python)
                self._rs = end
                if len(deferred) >= _MAX_DEFERRED:
                    self._flush_deferred()
                return
        if self._re - rs >= _HEAD_SIZE:  # buffered (most small frames): read it in place
            self._rs = rs + _HEAD_SIZE
            header: Any = self._rbv[rs:rs + _HEAD_SIZE]
        else:
            header = self._header
            self._recv_into(self._hview)
        magic, op, flags, ext_len, op_id, region, plen, imm, chunk, nchunks = \
            _HEADER.unpack(header)
        if magic != w.MAGIC:
            raise ProtocolError(f"bad frame magic {magic:#x}")
        if ext_len > w.MAX_EXT or plen > w.MAX_PAYLOAD:
            raise ProtocolError(f"oversized frame (ext {ext_len}, payload {plen})")
        if nchunks == 0 or chunk >= nchunks:
            raise ProtocolError(f"bad chunk numbering {chunk}/{nchunks}")
        handler = self._handlers.get(op)
        if handler is None:
            raise ProtocolError(f"unexpected frame type {op} on a "
                                f"{'dialled' if self.dialer else 'accepted'} link")
        ext = b""
        rx = self.rx
        if rx is not None:  # ext and tag in one read; checked before anything acts
            head = bytes(header)  # (a view of the read-ahead buffer, which the next read refills)
            rs, n = self._rs, ext_len + TAG
            if self._re - rs >= n:
                self._rs = rs + n
                ext = bytes(self._rbv[rs:rs + ext_len])
                tag: Any = self._rbv[rs + ext_len:rs + n]
            else:
                buf = bytearray(n)
                self._recv_into(memoryview(buf))
                ext, tag = bytes(buf[:ext_len]), buf[ext_len:]
            d = self._rx_head(head + ext)
            if not FrameMac.same(d[:TAG], tag):
                raise ProtocolError("a frame failed its integrity check (changed, "
                                    "replayed, reordered or spliced on the way)")
            if plen:
                self._pmac = rx.payload(d, plen)
        elif ext_len:
            rs = self._rs
            if self._re - rs >= ext_len:
                self._rs = rs + ext_len
                ext = bytes(self._rbv[rs:rs + ext_len])
            else:
                ext_buf = bytearray(ext_len)
                self._recv_into(memoryview(ext_buf))
                ext = bytes(ext_buf)
        handler(flags, ext, op_id, region, plen, imm, chunk, nchunks)
        if self._pmac is not None:
            raise ProtocolError(f"frame type {op}: payload not checked")  # a bug

    # acceptor side: a peer's operations on our memory

    def _acceptor_handlers(self) -> dict[int, Callable[..., None]]:
        return {
            w.Op.WRITE: self._on_write,
            w.Op.SHM_DONE: self._on_write,
            w.Op.IMM: self._on_imm,
            w.Op.SEND: self._on_send,
            w.Op.READ_REQ: self._on_read_req,
            w.Op.SHM_OPEN: self._on_shm_open,
            w.Op.PING: self._on_ping,
            w.Op.SHM_REVOKED: self._on_shm_revoked,
        }

    def _ack(self, op_id: int, chunk: int, status: int = 0, text: str = "",
             op: int = w.Op.ACK) -> None:
        if not status and op == w.Op.ACK and self.batch_acks:
            deferred = self._deferred  # (what _defer does, for the common case)
            deferred.append((op_id, chunk))
            if len(deferred) >= _MAX_DEFERRED:
                self._flush_deferred()
            return
        ext = text.encode()[:4000] if text else b""
        self._defer(w.pack_header(op, status, len(ext), op_id, 0, 0, 0, chunk, chunk + 1) + ext)

    @staticmethod
    def _table(ext: bytes) -> tuple[bytes, int, np.ndarray]:
        """An op's key, its end and this frame's segment table."""
        body = len(ext) - w.OP_HEAD.size
        if body < 0 or body % w.SEG_DTYPE.itemsize:
            raise ProtocolError("malformed segment table")
        key, end = w.OP_HEAD.unpack_from(ext)
        return key, end, np.frombuffer(ext, dtype=w.SEG_DTYPE, offset=w.OP_HEAD.size)

    def _on_write(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                  chunk: int, nchunks: int) -> None:
        if len(ext) != _ONE_SEG_EXT:
            self._on_write_table(flags, ext, op_id, region, plen, imm, chunk, nchunks)
            return
        # one segment (every small write): no numpy, and no calls the common case can skip
        key, end, off, n = _OP_ONE_SEG.unpack(ext)
        if plen and n != plen:
            raise ProtocolError(f"segment table says {n} bytes, frame carries {plen}")
        handler = self.t.handler
        status, text, view = handler.resolve(region, key, _REMOTE_WRITE, (off, n), end)
        if status != w.Status.OK or view is None:
            self._refuse(plen, op_id, chunk, status, text)
            return
        if plen:
            dst = view[off:off + n]
            rs = self._rs
            mac = self._pmac
            if self._re - rs >= (n if mac is None else n + TAG):  # buffered (with its tag)
                src = self._rbv[rs:rs + n]
                if mac is None:
                    self._rs = rs + n
                else:  # what _end_payload does, on the buffered tag, before a byte lands
                    self._pmac = None
                    self._rs = rs + n + TAG
                    mac.update(src)
                    if not FrameMac.same(mac.finalize(), self._rbv[rs + n:rs + n + TAG]):
                        raise ProtocolError(_PAYLOAD_MAC_FAILED)
                dst[:] = src
            else:
                self._recv_into(dst)
                self._end_payload()
        if flags & w.FLAG_IMM:
            status, text = handler.landed(self.peer.engine_id, op_id, chunk, nchunks, imm)
            if status or not self.batch_acks:
                self._ack(op_id, chunk, status, text)
                return
        elif not self.batch_acks:
            self._ack(op_id, chunk)
            return
        deferred = self._deferred  # an OK acknowledgement, sent with the burst's others
        deferred.append((op_id, chunk))
        if len(deferred) >= _MAX_DEFERRED:
            self._flush_deferred()

    def _on_write_table(self, flags: int, ext: bytes, op_id: int, region: int, plen: int,
                        imm: int, chunk: int, nchunks: int) -> None:
        """:meth:`_on_write` of a frame with a segment table (or an shm write's notice)."""
        key, end, table = self._table(ext)
        is_shm = plen == 0 and len(table) and int(table["length"].sum()) > 0
        total = int(table["length"].sum()) if len(table) else 0
        if not is_shm and total != plen:
            raise ProtocolError(f"segment table says {total} bytes, frame carries {plen}")
        status, text, view = self.t.handler.resolve(region, key, _REMOTE_WRITE, table, end)
        if status != w.Status.OK or view is None:
            self._refuse(plen, op_id, chunk, status, text)
            return
        if plen:
            offs, lens = table["offset"], table["length"]
            if len(offs) > 1:  # pieces that land back to back are received (and MACed) as one
                brk = np.empty(len(offs), dtype=bool)
                brk[0] = True
                np.not_equal(offs[1:], offs[:-1] + lens[:-1], out=brk[1:])
                if not brk.all():
                    starts = np.flatnonzero(brk)
                    offs, lens = offs[starts], np.add.reduceat(lens, starts)
            self._recv_many([view[o:o + n] for o, n in zip(offs.tolist(), lens.tolist()) if n])
            self._end_payload()
        status, text = self.t.handler.landed(self.peer.engine_id, op_id, chunk, nchunks,
                                             imm if flags & w.FLAG_IMM else None)
        self._ack(op_id, chunk, status, text)

    def _refuse(self, plen: int, op_id: int, chunk: int, status: int, text: str) -> None:
        """Skip a refused frame's payload (it still counts for the MAC) and answer ``status``."""
        self._drain(plen)
        self._end_payload()
        self._ack(op_id, chunk, status, text)

    def _on_imm(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                chunk: int, nchunks: int) -> None:
        if plen:  # (an immediate carries none; its MAC then has nothing to check)
            self._drain(plen)
            self._end_payload()
        status, text = self.t.handler.landed(self.peer.engine_id, op_id, chunk, nchunks, imm)
        self._ack(op_id, chunk, status, text)

    def _on_send(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                 chunk: int, nchunks: int) -> None:
        if plen > w.MAX_MESSAGE:
            raise ProtocolError(f"message of {plen} bytes exceeds {w.MAX_MESSAGE}")
        handler = self.t.handler
        # counted against the inbox before a byte is allocated, and allocated as it arrives
        cost = w.charge(plen)
        sender = self.peer_key
        if not handler.reserve_inbox(cost, sender):
            self._refuse(plen, op_id, chunk, w.Status.INBOX_FULL, "receiver's inbox (or this "
                         "sender's share of it) is full: it is not calling recv()")
            return
        try:
            data = self._recv_growing(plen)
            self._end_payload()
        except BaseException:
            handler.release_inbox(cost, sender)
            raise
        key = (self.peer.engine_id, op_id)
        if not self.t.first_delivery(key):
            # resent after a link failure that lost only the acknowledgement: delivered once
            handler.release_inbox(cost, sender)
            self._ack(op_id, chunk)
            return
        status, text = handler.deliver(self.peer, imm, data, reserved=cost)
        if status != w.Status.OK:
            self.t.forget_delivery(key)  # the sender fails it; a retry is a new message
        self._ack(op_id, chunk, status, text)

    def _recv_growing(self, n: int) -> bytes:
        """Receive ``n`` bytes into memory allocated as they arrive (1 MiB pieces), so a header
        that claims much and sends little costs little. Pieces are never resized (a helper
        thread may still be MACing one)."""
        pieces = []
        left = n
        while left:
            piece = bytearray(min(left, 1 << 20))
            self._recv_into(memoryview(piece))
            pieces.append(piece)
            left -= len(piece)
        return b"".join(pieces)

    def _on_read_req(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                     chunk: int, nchunks: int) -> None:
        key, end, table = self._table(ext)
        if len(table) != 1 or plen:
            raise ProtocolError("a read request names exactly one segment and carries no payload")
        status, text, view = self.t.handler.resolve(region, key, Access.REMOTE_READ, table, end)
        if status != w.Status.OK or view is None:
            self._ack(op_id, chunk, status, text, op=w.Op.READ_RESP)
            return
        off, n = int(table["offset"][0]), int(table["length"][0])
        head = w.pack_header(w.Op.READ_RESP, 0, 0, op_id, region, n, 0, chunk, chunk + 1)
        frame: list[Any] = [head, view[off:off + n]] if n else [head]
        with self.cond:  # data goes through the writer: never block this thread on a send
            self.replies.append(frame)
            self.cond.notify_all()

    def _on_shm_open(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                     chunk: int, nchunks: int) -> None:
        if len(ext) != 16 or plen:
            raise ProtocolError("malformed shared-memory open request")
        status, text, grant = self.t.handler.shm_open(self.peer.engine_id, region, ext, imm)
        body = grant if status == w.Status.OK else text.encode()[:4000]
        self._defer(w.pack_header(w.Op.SHM_OPEN_RESP, status, len(body), op_id, 0, 0, 0, chunk,
                                  chunk + 1) + body)

    def _on_shm_revoked(self, flags: int, ext: bytes, op_id: int, *_: int) -> None:
        self.t.on_shm_revoked(op_id)

    def _on_ping(self, flags: int, ext: bytes, op_id: int, *_: int) -> None:
        self._defer(w.pack_header(w.Op.PONG, 0, 0, op_id))
