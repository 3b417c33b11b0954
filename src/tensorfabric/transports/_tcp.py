"""TCP: several authenticated links per peer, large ops striped across them.

Each link is one TCP connection with a receive thread and a writer thread. A peer's chunks
wait in one queue shared by its links: a writer takes the next chunk when its socket has
taken the last one, so faster links carry more (work stealing). Payloads are received with
``recv_into`` straight into the destination region. Receive threads never block on sending
(acknowledgements go out with MSG_DONTWAIT or through the writer), so two engines writing to
each other at full speed cannot deadlock.

A link that fails (reset, or no progress for ``link_timeout`` while it has work in flight) is
closed; its unacknowledged chunks go back to the front of the queue for the other links, and it
is redialled in the background. When every link is gone and the peer stays unreachable for
``reconnect_grace`` seconds (or refuses connections), its transfers fail with BrokenError.
"""

from __future__ import annotations

import collections
import itertools
import logging
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable

import numpy as np

from .. import _auth, _wire as w
from .._address import EngineAddress
from .._errors import (
    AuthenticationError,
    BrokenError,
    ClosedError,
    ProtocolError,
    TensorFabricError,
)
from .._ops import DEFAULT_CHUNK, Chunk, WireOp, read_chunks, write_chunks
from .._region import Access, RegionDescriptor
from ._base import InboundHandler, Transport

log = logging.getLogger("tensorfabric.tcp")

IOV_MAX = 1024
_HELLO = struct.Struct("<4s16s16s32sII")  # magic, my id, wanted id, nonce, link index, addr len
_REPLY = struct.Struct("<4s16s32s32s")  # magic, my id, nonce, mac
_INLINE_MAX = 64 << 10  # chunks up to this size may be sent from the caller's thread


class _PeerGone(Exception):
    """Internal: the connection ended (EOF, reset, or closed by us)."""


def _set_keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if got == 0:
            raise _PeerGone("connection closed during handshake")
        view = view[got:]
    return bytes(buf)


class Conn:
    """One authenticated TCP connection (a link) and its two threads."""

    def __init__(self, transport: TcpTransport, sock: socket.socket, *, dialer: bool,
                 peer: EngineAddress, index: int, peer_links: PeerLinks | None) -> None:
        self.t = transport
        self.sock = sock
        self.dialer = dialer
        self.peer = peer
        self.peer_name = str(peer)
        self.index = index
        self.links = peer_links
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.cond = peer_links.cond if peer_links is not None else threading.Condition()
        self.send_lock = threading.Lock()
        self.replies: collections.deque[list[Any]] = collections.deque()
        self.inflight: dict[tuple[int, int], Chunk] = {}
        self.tail: bytes = b""  # the unsent end of a frame started with MSG_DONTWAIT
        self.alive = True
        self.last_rx = self.last_tx = time.monotonic()
        self.bytes_sent = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        role = "dial" if self.dialer else "accept"
        for target, what in ((self._recv_loop, "rx"), (self._write_loop, "tx")):
            th = threading.Thread(target=target, name=f"tf-{role}{self.index}-{what}", daemon=True)
            th.start()
            self._threads.append(th)

    # -- sending ------------------------------------------------------------------------

    def _send_all(self, bufs: list[Any]) -> None:
        """Send a whole frame; the send lock is held by the caller."""
        sock = self.sock
        if self.tail:
            tail, self.tail = self.tail, b""
            sock.sendall(tail)
        if self.tls:
            for b in bufs:
                sock.sendall(b)
            self.last_tx = time.monotonic()
            return
        bufs = [memoryview(b).cast("B") if not isinstance(b, (bytes, memoryview)) else b for b in bufs]
        while bufs:
            sent = sock.sendmsg(bufs[:IOV_MAX])
            self.last_tx = time.monotonic()
            self.bytes_sent += sent
            # drop what went out
            while bufs and sent >= len(bufs[0]):
                sent -= len(bufs[0])
                bufs.pop(0)
            if sent:
                bufs[0] = memoryview(bufs[0])[sent:]

    def _try_send_nowait(self, data: bytes) -> bool:
        """Send a small frame without ever blocking (receive threads use this)."""
        if self.tls or not self.send_lock.acquire(blocking=False):
            return False
        try:
            if self.tail:
                try:
                    n = self.sock.send(self.tail, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return False
                self.tail = self.tail[n:]
                if self.tail:
                    return False
            try:
                n = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            if n < len(data):
                self.tail = data[n:]  # the writer finishes it before anything else
                with self.cond:
                    self.cond.notify_all()
            return True
        except OSError:
            return False
        finally:
            self.send_lock.release()

    def reply(self, frame: list[Any]) -> None:
        """Send a reply from the receive thread: now if the socket takes it, else via the writer."""
        if len(frame) == 1 and self._try_send_nowait(frame[0]):
            return
        with self.cond:
            self.replies.append(frame)
            self.cond.notify_all()

    def send_chunk_inline(self, chunk: Chunk) -> bool:
        """Caller-thread fast path for a small chunk on an idle link."""
        if not self.alive or not self.send_lock.acquire(blocking=False):
            return False
        try:
            if not self._track(chunk):
                return False
            try:
                self._send_all([chunk.head, *chunk.payload])
            except OSError as exc:
                self.t._spawn(self.fail, exc)  # requeues the chunk with the rest of inflight
            return True
        finally:
            self.send_lock.release()

    def _track(self, chunk: Chunk) -> bool:
        """Record a chunk as in flight on this link, unless the link already failed."""
        with self.cond:
            if not self.alive:
                return False
            self.inflight[chunk.key] = chunk
            return True

    def _next_item(self) -> tuple[str, Any] | None:
        links = self.links
        with self.cond:
            while True:
                if not self.alive:
                    return None
                if self.replies:
                    return ("frame", self.replies.popleft())
                if links is not None and links.queue and len(self.inflight) < self.t.window:
                    # a bounded window per link: a slow link holds few chunks, so it never
                    # keeps the tail of a transfer waiting long after the fast links are done
                    return ("chunk", links.queue.popleft())
                if self.tail:
                    return ("frame", [])
                self.cond.wait(1.0)

    def _write_loop(self) -> None:
        try:
            while True:
                item = self._next_item()
                if item is None:
                    return
                kind, obj = item
                with self.send_lock:
                    if kind == "chunk":
                        chunk: Chunk = obj
                        if chunk.wop.dead:
                            continue
                        if not self._track(chunk):
                            if self.links is not None:
                                self.links.requeue(chunk)
                            return
                        self._send_all([chunk.head, *chunk.payload])
                    else:
                        self._send_all(obj)
        except (OSError, ValueError) as exc:
            self.fail(exc)

    # -- receiving ----------------------------------------------------------------------

    def _recv_into(self, view: memoryview) -> None:
        sock = self.sock
        while view:
            n = sock.recv_into(view)
            if n == 0:
                raise _PeerGone("peer closed the connection")
            self.last_rx = time.monotonic()
            view = view[n:]

    def _recv_many(self, views: list[memoryview]) -> None:
        if self.tls or len(views) == 1:
            for v in views:
                self._recv_into(v)
            return
        sock = self.sock
        i = 0
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

    def _drain(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            k = min(n, len(scratch))
            self._recv_into(scratch[:k])
            n -= k

    def _recv_loop(self) -> None:
        header = bytearray(w.HEADER_SIZE)
        hview = memoryview(header)
        handlers = self._dialer_handlers() if self.dialer else self._acceptor_handlers()
        try:
            while True:
                self._recv_into(hview)
                magic, op, flags, ext_len, op_id, region, plen, imm, chunk, nchunks = \
                    w.HEADER.unpack(header)
                if magic != w.MAGIC:
                    raise ProtocolError(f"bad frame magic {magic:#x}")
                if ext_len > w.MAX_EXT or plen > w.MAX_PAYLOAD:
                    raise ProtocolError(f"oversized frame (ext {ext_len}, payload {plen})")
                if nchunks == 0 or chunk >= nchunks:
                    raise ProtocolError(f"bad chunk numbering {chunk}/{nchunks}")
                handler = handlers.get(op)
                if handler is None:
                    raise ProtocolError(f"unexpected frame type {op} on a "
                                        f"{'dialled' if self.dialer else 'accepted'} link")
                ext = b""
                if ext_len:
                    ext_buf = bytearray(ext_len)
                    self._recv_into(memoryview(ext_buf))
                    ext = bytes(ext_buf)
                handler(flags, ext, op_id, region, plen, imm, chunk, nchunks)
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
        }

    def _ack(self, op_id: int, chunk: int, status: int = 0, text: str = "",
             op: int = w.Op.ACK) -> None:
        ext = text.encode()[:4000]
        self.reply([w.pack_header(op, status, len(ext), op_id, 0, 0, 0, chunk, chunk + 1) + ext])

    @staticmethod
    def _table(ext: bytes) -> np.ndarray:
        body = len(ext) - 16
        if body < 0 or body % w.SEG_DTYPE.itemsize:
            raise ProtocolError("malformed segment table")
        return np.frombuffer(ext, dtype=w.SEG_DTYPE, offset=16)

    def _on_write(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                  chunk: int, nchunks: int) -> None:
        table = self._table(ext)
        is_shm = plen == 0 and len(table) and int(table["length"].sum()) > 0
        total = int(table["length"].sum()) if len(table) else 0
        if not is_shm and total != plen:
            raise ProtocolError(f"segment table says {total} bytes, frame carries {plen}")
        status, text, view = self.t.handler.resolve(region, ext[:16], Access.REMOTE_WRITE, table)
        if status != w.Status.OK or view is None:
            self._drain(plen)
            self._ack(op_id, chunk, status, text)
            return
        if plen:
            offs = table["offset"].tolist()
            lens = table["length"].tolist()
            self._recv_many([view[o:o + n] for o, n in zip(offs, lens) if n])
        self.t.handler.landed(self.peer.engine_id, op_id, chunk, nchunks,
                              imm if flags & w.FLAG_IMM else None)
        self._ack(op_id, chunk)

    def _on_imm(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                chunk: int, nchunks: int) -> None:
        self._drain(plen)
        self.t.handler.landed(self.peer.engine_id, op_id, chunk, nchunks, imm)
        self._ack(op_id, chunk)

    def _on_send(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                 chunk: int, nchunks: int) -> None:
        if plen > w.MAX_MESSAGE:
            raise ProtocolError(f"message of {plen} bytes exceeds {w.MAX_MESSAGE}")
        data = bytearray(plen)
        self._recv_into(memoryview(data))
        status, text = self.t.handler.deliver(self.peer, imm, bytes(data))
        self._ack(op_id, chunk, status, text)

    def _on_read_req(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                     chunk: int, nchunks: int) -> None:
        table = self._table(ext)
        if len(table) != 1 or plen:
            raise ProtocolError("a read request names exactly one segment and carries no payload")
        status, text, view = self.t.handler.resolve(region, ext[:16], Access.REMOTE_READ, table)
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
        empty = np.zeros(0, dtype=w.SEG_DTYPE)
        status, text, _ = self.t.handler.resolve(region, ext, imm, empty)
        self._ack(op_id, chunk, status, text, op=w.Op.SHM_OPEN_RESP)

    def _on_ping(self, flags: int, ext: bytes, op_id: int, *_: int) -> None:
        self.reply([w.pack_header(w.Op.PONG, 0, 0, op_id)])

    # dialer side: replies to our operations

    def _dialer_handlers(self) -> dict[int, Callable[..., None]]:
        return {
            w.Op.ACK: self._on_reply,
            w.Op.SHM_OPEN_RESP: self._on_reply,
            w.Op.READ_RESP: self._on_read_resp,
            w.Op.PONG: lambda *a: None,
        }

    def _pop_inflight(self, op_id: int, chunk: int) -> Chunk | None:
        with self.cond:
            c = self.inflight.pop((op_id, chunk), None)
            if c is not None and len(self.inflight) == self.t.window - 1:
                self.cond.notify_all()  # this link's writer may take the next chunk
            return c

    def _on_reply(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                  chunk: int, nchunks: int) -> None:
        self._drain(plen)
        c = self._pop_inflight(op_id, chunk)
        if c is not None:
            c.wop.chunk_replied(flags, ext.decode(errors="replace"), c.region)

    def _on_read_resp(self, flags: int, ext: bytes, op_id: int, region: int, plen: int, imm: int,
                      chunk: int, nchunks: int) -> None:
        c = self._pop_inflight(op_id, chunk)
        if c is None or c.dst is None or flags != w.Status.OK:
            self._drain(plen)
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
        c.wop.chunk_replied(w.Status.OK, "", c.region)

    # -- failure --------------------------------------------------------------------------

    def fail(self, exc: BaseException | None = None) -> None:
        """Close this link; hand its unacknowledged chunks back to the peer's other links."""
        with self.cond:
            if not self.alive:
                return
            self.alive = False
            inflight = list(self.inflight.values())
            self.inflight.clear()
            self.replies.clear()
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self.links is not None:
            self.links.link_failed(self, inflight, exc)
        else:
            self.t._forget_accepted(self)

    def stalled(self, now: float, timeout: float) -> bool:
        return bool(self.inflight) and now - max(self.last_rx, self.last_tx) > timeout


class PeerLinks:
    """The links this engine dialled to one peer, and the queue of chunks waiting for them."""

    def __init__(self, transport: TcpTransport, peer: EngineAddress) -> None:
        self.t = transport
        self.peer = peer
        self.name = str(peer)
        self.cond = threading.Condition()
        self.queue: collections.deque[Chunk] = collections.deque()
        self.conns: list[Conn | None] = [None] * transport.nlinks
        self.rr = 0
        self.down_since: float | None = None
        self.refused = False
        self.last_error: BaseException | None = None
        self.next_redial = [0.0] * transport.nlinks
        self.dialing = [False] * transport.nlinks
        self.closed = False
        self.failures = 0  # links lost so far
        self.requeued = 0  # chunks resent on other links after a loss

    def live(self) -> list[Conn]:
        return [c for c in self.conns if c is not None and c.alive]

    def connect_first(self, timeout: float) -> None:
        """Dial link 0 in the caller's thread (so bad secrets and dead peers raise here) and
        the other links in the background."""
        if self.live():
            return
        try:
            self._dial(0, timeout)
        except (OSError, _PeerGone) as exc:
            raise BrokenError(f"cannot reach peer {self.name}: {exc}", peer=self.name) from exc
        for i in range(1, len(self.conns)):
            self._dial_later(i, 0.0)

    def _dial(self, i: int, timeout: float) -> Conn:
        conn = self.t._dial(self.peer, i, self)
        with self.cond:
            old = self.conns[i]
            self.conns[i] = conn
            self.down_since = None
            self.refused = False
            self.cond.notify_all()
        if old is not None:
            old.fail()
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
        if (len(chunks) == 1 and chunks[0].nbytes <= _INLINE_MAX and not self.queue):
            conns = self.live()
            if conns:
                n = len(conns)
                self.rr = (self.rr + 1) % n
                for k in range(n):
                    if conns[(self.rr + k) % n].send_chunk_inline(chunks[0]):
                        return
        with self.cond:
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
                log.warning("link %d to %s made no progress for %.1f s; closing it", c.index,
                            self.name, self.t.link_timeout)
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


class TcpTransport(Transport):
    """Several TCP links per peer; see the module docstring."""

    name = "tcp"
    one_sided = True

    def __init__(
        self,
        *,
        engine_id: bytes,
        secret: bytes,
        handler: InboundHandler,
        listen: list[tuple[str, int]],
        link_addrs: list[str | None],
        connect_timeout: float = 5.0,
        link_timeout: float = 5.0,
        reconnect_grace: float = 2.0,
        tls_server: ssl.SSLContext | None = None,
        tls_client: ssl.SSLContext | None = None,
        chunk_bytes: int = DEFAULT_CHUNK,
        window: int = 4,
    ) -> None:
        self.engine_id = engine_id
        self.window = window  # chunks in flight (sent, not acknowledged) per link
        self.chunk_bytes = chunk_bytes
        self.op_ids = itertools.count(1)  # shared with the engine: unique per dialled peer
        self.secret = secret
        self.handler = handler
        self.link_addrs = link_addrs
        self.nlinks = len(link_addrs)
        self.connect_timeout = connect_timeout
        self.link_timeout = link_timeout
        self.reconnect_grace = reconnect_grace
        self.tls_server = tls_server
        self.tls_client = tls_client
        self.address: EngineAddress | None = None  # set by the engine once endpoints are known
        self._lock = threading.Lock()
        self._peers: dict[bytes, PeerLinks] = {}
        self._accepted: set[Conn] = set()
        self._closed = False
        self._listeners: list[socket.socket] = []
        self.endpoints: list[tuple[str, int]] = []
        try:
            for host, port in listen:
                ls = socket.create_server((host, port), backlog=128, reuse_port=False)
                self._listeners.append(ls)
                self.endpoints.append((host, ls.getsockname()[1]))
        except OSError:
            for ls in self._listeners:
                ls.close()
            raise

    def start(self, address: EngineAddress) -> None:
        self.address = address
        for ls in self._listeners:
            self._spawn(self._accept_loop, ls)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        th = threading.Thread(target=fn, args=args, daemon=True, name="tf-tcp")
        th.start()
        return th

    # -- connection setup ---------------------------------------------------------------

    def _accept_loop(self, ls: socket.socket) -> None:
        while not self._closed:
            try:
                sock, _ = ls.accept()
            except OSError:
                return
            self._spawn(self._handshake_accept, sock)

    def _handshake_accept(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(self.connect_timeout)
            _set_keepalive(sock)
            if self.tls_server is not None:
                sock = self.tls_server.wrap_socket(sock, server_side=True)
            magic, their_id, wanted, their_nonce, index, alen = _HELLO.unpack(
                _recv_exact(sock, _HELLO.size))
            if magic != b"tfH1" or alen > 65536:
                raise ProtocolError("not a tensorfabric peer")
            peer = EngineAddress.from_bytes(_recv_exact(sock, alen))
            if peer.engine_id != their_id:
                raise ProtocolError("hello names two different engines")
            if wanted != self.engine_id:
                sock.sendall(b"tfNO" + b"\0" * (_REPLY.size - 4))
                raise ProtocolError("peer dialled a different engine at this address")
            nonce = _auth.new_nonce()
            ids = their_id + self.engine_id
            mac = _auth.prove(self.secret, b"A", their_nonce, nonce, ids)
            sock.sendall(_REPLY.pack(b"tfH1", self.engine_id, nonce, mac))
            their_mac = _recv_exact(sock, _auth.MAC_BYTES)
            if not _auth.check(_auth.prove(self.secret, b"D", nonce, their_nonce, ids), their_mac):
                sock.sendall(b"NO\0\0")
                raise AuthenticationError(f"peer {peer} failed the cluster-secret check")
            sock.sendall(b"OK\0\0")
            sock.settimeout(None)
        except (OSError, _PeerGone, TensorFabricError, struct.error) as exc:
            log.warning("rejected incoming connection: %s", exc)
            try:
                sock.close()
            except OSError:
                pass
            return
        conn = Conn(self, sock, dialer=False, peer=peer, index=index, peer_links=None)
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._accepted.add(conn)
        conn.start()

    def _dial(self, peer: EngineAddress, i: int, links: PeerLinks) -> Conn:
        if self._closed:
            raise ClosedError("engine is closed")
        assert self.address is not None
        host, port = peer.endpoints[i % len(peer.endpoints)]
        local = self.link_addrs[i]
        sock = socket.create_connection((host, port), timeout=self.connect_timeout,
                                        source_address=(local, 0) if local else None)
        try:
            _set_keepalive(sock)
            if self.tls_client is not None:
                sock = self.tls_client.wrap_socket(sock, server_hostname=host)
            nonce = _auth.new_nonce()
            me = self.address.to_bytes()
            sock.sendall(_HELLO.pack(b"tfH1", self.engine_id, peer.engine_id, nonce, i, len(me)) + me)
            magic, their_id, their_nonce, their_mac = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
            if magic == b"tfNO":
                raise BrokenError(f"{host}:{port} is a different engine than {peer}", peer=str(peer))
            ids = self.engine_id + peer.engine_id
            if magic != b"tfH1" or their_id != peer.engine_id or not _auth.check(
                    _auth.prove(self.secret, b"A", nonce, their_nonce, ids), their_mac):
                raise AuthenticationError(
                    f"peer {peer} could not prove the cluster secret: the engines were given "
                    "different secrets", peer=str(peer))
            sock.sendall(_auth.prove(self.secret, b"D", their_nonce, nonce, ids))
            verdict = _recv_exact(sock, 4)
            if verdict != b"OK\0\0":
                raise AuthenticationError(
                    f"peer {peer} rejected this engine's cluster secret: the engines were given "
                    "different secrets", peer=str(peer))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return Conn(self, sock, dialer=True, peer=peer, index=i, peer_links=links)

    def peer_links(self, peer: EngineAddress) -> PeerLinks:
        with self._lock:
            if self._closed:
                raise ClosedError("engine is closed")
            links = self._peers.get(peer.engine_id)
            if links is None:
                links = self._peers[peer.engine_id] = PeerLinks(self, peer)
        return links

    def _forget_accepted(self, conn: Conn) -> None:
        with self._lock:
            self._accepted.discard(conn)

    # -- Transport ----------------------------------------------------------------------

    def write(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src: memoryview,
              src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
              imm: int | None) -> None:
        chunks = write_chunks(wop, w.Op.WRITE, desc.region_id, desc.key, imm, src, src_off,
                              dst_off, lengths, self.chunk_bytes, self.nlinks)
        self.submit(peer, chunks)

    def read(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src_offset: int,
             dst: memoryview) -> None:
        self.submit(peer, read_chunks(wop, desc.region_id, desc.key, src_offset, dst,
                                      self.chunk_bytes))

    def submit(self, peer: EngineAddress, chunks: list[Chunk]) -> None:
        """Queue ready-made chunks (control frames, or another transport's notifications)."""
        links = self.peer_links(peer)
        if not links.live():
            links.connect_first(self.connect_timeout)
        links.submit(chunks)

    def tick(self, now: float) -> None:
        with self._lock:
            peers = list(self._peers.values())
        for links in peers:
            links.tick(now)

    def link_stats(self) -> dict[str, list[int]]:
        with self._lock:
            return {p.name: [c.bytes_sent if c else -1 for c in p.conns] for p in self._peers.values()}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers.values())
            accepted = list(self._accepted)
            self._peers.clear()
            self._accepted.clear()
        for ls in self._listeners:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        err = ClosedError("engine closed")
        for p in peers:
            p.close(err)
        for c in accepted:
            c.fail(err)


__all__ = ["TcpTransport", "Conn", "PeerLinks"]
