"""One TCP link (a :class:`Conn`): its writer thread, its receive thread and its failure."""

from __future__ import annotations

import collections
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

from .._errors import ProtocolError
from .._ops import Chunk
from ._handshake import IOV_MAX, Session
from ._rx import Receiver

if TYPE_CHECKING:
    from ._peers import PeerLinks
    from ._tcp import TcpTransport


MAX_REPLIES = 1024  # replies queued for a peer that is not reading them


class Conn(Receiver):
    """One authenticated TCP connection (a link) and its two threads."""

    def __init__(self, transport: TcpTransport, session: Session, *, dialer: bool,
                 peer_links: PeerLinks | None) -> None:
        self.t = transport
        self.sock = sock = session.sock
        self.dialer = dialer
        self.peer = session.peer
        self.peer_name = str(session.peer)
        self.index = session.link
        self.tx = session.tx  # MACs our frames (None: integrity off or carried by TLS)
        self.rx = session.rx
        self._pmac: Any = None  # the MAC of the payload being received
        self._pfut: Any = None  # its last update running on a helper thread
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
        last: Any = None
        if self.tx is not None and bufs:
            bufs, last = self.tx.seal_async(bufs)
            if isinstance(last, bytes):
                if last:
                    bufs.append(last)  # small: computed already, one send
                last = None
        self._send_bufs(bufs)
        if last is not None:  # the payload's tag, hashed while the payload went out
            self._send_bufs([last.result()])

    def _send_bufs(self, bufs: list[Any]) -> None:
        sock = self.sock
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
            if self.tx is not None:
                data = b"".join(self.tx.seal([data]))
            try:
                n = self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                if self.tx is not None:
                    self.tx.seq -= 1  # not sent: the writer sends it with this number
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
            # an honest peer has a few chunks in flight per link, so a few replies queue at
            # most; a peer that sends and never reads is stopped here, then cut off
            if len(self.replies) >= MAX_REPLIES and not self.cond.wait_for(
                    lambda: len(self.replies) < MAX_REPLIES or not self.alive,
                    self.t.link_timeout):
                raise ProtocolError(f"peer reads none of our {MAX_REPLIES} replies")
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
                    frame = self.replies.popleft()
                    if len(self.replies) == MAX_REPLIES - 1:
                        self.cond.notify_all()  # a receive thread may wait for room
                    return ("frame", frame)
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

    def flush_replies(self, timeout: float) -> None:
        """Send the replies still queued (acknowledgements of ops that landed) before closing,
        so a peer whose last op arrived does not see it fail."""
        if not self.alive or not self.send_lock.acquire(timeout=timeout):
            return
        try:
            with self.cond:
                frames = list(self.replies)
                self.replies.clear()
            if frames or self.tail:
                self.sock.settimeout(timeout)
                for frame in frames:
                    self._send_all(frame)
                if self.tail:
                    self._send_all([])
        except OSError:
            pass
        finally:
            self.send_lock.release()

    def stalled(self, now: float, timeout: float) -> bool:
        return bool(self.inflight) and now - max(self.last_rx, self.last_tx) > timeout

