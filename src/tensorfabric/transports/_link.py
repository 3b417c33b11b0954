"""One TCP link (a :class:`Conn`): its writer thread, its receive thread and its failure."""

from __future__ import annotations

import collections
import functools
import itertools
import select
import socket
import ssl
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import _compiled
from .. import _wire as w
from .._errors import ProtocolError
from .._ops import Chunk
from ._handshake import IOV_MAX, Session
from ._integrity import NATIVE_PARTS
from ._poller import ARM as _ARM
from ._rx import RBUF, Receiver

if TYPE_CHECKING:
    from ._peers import PeerLinks
    from ._tcp import TcpTransport


MAX_REPLIES = 1024  # replies queued for a peer that is not reading them
SMALL = 64 << 10  #: chunks up to this size are sent inline or batched
SMALL_WINDOW = 64  #: small chunks in flight per link (large ones: the transport's window)
# struct tcp_info's head (linux/tcp.h): state, ca_state, retransmits, probes, backoff, options,
# wscales, flags; rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
# last_data_sent, last_ack_sent, last_data_recv, last_ack_recv (ms)
_TCP_INFO = struct.Struct("<8B13I")
_BYTES_LIKE = itertools.repeat((bytes, memoryview))  # isinstance's second argument, for map


def tcp_path(sock: socket.socket) -> tuple[int, int, int, float] | None:
    """What the kernel knows of a connection's path: (segments sent and not acknowledged,
    retransmission timeouts in a row, zero-window probes unanswered, seconds since the peer's
    kernel last acknowledged anything); None where TCP_INFO is not available."""
    opt = getattr(socket, "TCP_INFO", None)
    if opt is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, opt, _TCP_INFO.size)
    except OSError:
        return None
    if len(raw) < _TCP_INFO.size:
        return None
    f = _TCP_INFO.unpack(raw)
    return f[12], f[2], f[3], f[20] / 1000.0


class Conn(Receiver):
    """One authenticated TCP connection (a link) and its two threads."""

    def __init__(self, transport: TcpTransport, session: Session, *, dialer: bool,
                 peer_links: PeerLinks | None) -> None:
        self.t = transport
        self.sock = sock = session.sock
        self.dialer = dialer
        self.peer = session.peer
        self.peer_name = str(session.peer)
        self.peer_key = session.peer.to_bytes()
        self.index = session.link
        self.tx = tx = session.tx  # MACs our frames (None: integrity off or carried by TLS)
        self.rx = session.rx
        # tx.seal and rx.head (the MAC check of the frames the Python path reads), or the same
        # computed from C (_native.seal/head: no Python frame per frame) where the build reads
        # this version's native_parts() (it writes the counter in the host's byte order)
        native: Any = _compiled.native
        rx = self.rx
        c = getattr(native, "MAC_PARTS", 0) == NATIVE_PARTS and sys.byteorder == "little"
        partial = functools.partial
        self._seal: Any = (None if tx is None else partial(native.seal, tx.native_parts())
                           if c else tx.seal)
        self._rx_head: Any = (None if rx is None else partial(native.head, rx.native_parts())
                              if c else rx.head)
        self._pmac: Any = None  # the MAC of the payload being received
        self._rbv = memoryview(bytearray(RBUF))  # read-ahead (receive thread only)
        self._rs = self._re = 0
        # replies waiting to go out together: frames, and (op id, chunk) of OK acknowledgements
        # (sent as ACKS frames where the dialer agreed, see Receiver._pack_deferred)
        self._deferred: list[bytes | tuple[int, int]] = []
        self.batch_acks = session.acks and not dialer
        # the owner's compiled loop over buffered small writes (Receiver._frame), frame MACs
        # checked in it where the link has them; not on TLS links; to a peer that takes ACKS
        self._take: Any = (getattr(native, "take_writes", None) if self.batch_acks
                           and (self.rx is None or c)
                           and not isinstance(sock, ssl.SSLSocket)
                           and sys.byteorder == "little" else None)
        self._take_mac = (rx.native_parts() if self._take is not None and rx is not None
                          else None)
        self._targets = transport.handler.write_targets() if self._take is not None else {}
        self.links = peer_links
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.lock = peer_links.lock if peer_links is not None else threading.RLock()
        self.cond = peer_links.cond if peer_links is not None else threading.Condition(self.lock)
        self.send_lock = threading.Lock()
        self.replies: collections.deque[list[Any]] = collections.deque()
        self.inflight: dict[tuple[int, int], Chunk] = {}
        self.tail: bytes = b""  # the unsent end of a frame started with MSG_DONTWAIT
        self.alive = True
        self.last_rx = self.last_tx = time.monotonic()
        self._probed = 0.0  # when stalled() last put a PING in flight
        self.bytes_sent = 0
        self._threads: list[threading.Thread] = []
        self._header = bytearray(w.HEADER_SIZE)
        self._hview = memoryview(self._header)
        self._handlers = self._dialer_handlers() if dialer else self._acceptor_handlers()
        if dialer and session.acks:
            self._handlers[w.Op.ACKS] = self._on_acks
        # A dialled plain link's replies may be read by the caller waiting for them (see
        # read_for): whoever holds rlock reads frames; an epoll in one-shot mode tells exactly
        # one waiter (the latest: a waiting caller before the receive thread) that data is in.
        # An accepted plain link is read through the transport's shared poller instead
        # (whoever polls it: a receive thread, or the caller waiting in recv / expect).
        self.rlock = threading.Lock()
        self._ep: select.epoll | None = None
        self._fd = sock.fileno()
        poller = transport.poller
        #: what a group of transfers waits through when one of its parts reads for itself here
        self.blocker = poller.blocker if poller is not None else None
        self._shared = not dialer and not self.tls and poller is not None
        if self._shared and poller is not None:
            self._ep = poller.ep
        elif dialer and not self.tls and hasattr(select, "epoll"):
            self._ep = select.epoll(1)
            self._ep.register(self._fd, _ARM)

    def start(self) -> None:
        role = "dial" if self.dialer else "accept"
        rx: Any = self._poll_loop if self._ep is not None else self._recv_loop
        if self._shared:
            poller = self.t.poller
            assert poller is not None
            if not poller.add(self):  # the transport closed while this link was set up
                self.fail()
                return
            rx = lambda: poller.serve(self)
        for target, what in ((rx, "rx"), (self._write_loop, "tx")):
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
        if self._seal is not None and bufs:
            bufs = self._seal(bufs)
        self._send_bufs(bufs)

    def _send_bufs(self, bufs: list[Any]) -> None:
        sock = self.sock
        if self.tls:
            for b in bufs:
                sock.sendall(b)
            self.last_tx = time.monotonic()
            return
        if not all(map(isinstance, bufs, _BYTES_LIKE)):  # (no bytecode per buffer)
            bufs = [memoryview(x).cast("B") if not isinstance(x, (bytes, memoryview)) else x
                    for x in bufs]
        i, n = 0, len(bufs)
        while i < n:
            part = bufs if n <= IOV_MAX else bufs[i:i + IOV_MAX]
            sent = sock.sendmsg(part)
            self.last_tx = time.monotonic()
            self.bytes_sent += sent
            if sent == sum(map(len, part)):  # all of it went (the usual case)
                i += len(part)
                continue
            # the socket took part of it: skip what went out, send the rest
            while sent >= len(bufs[i]):
                sent -= len(bufs[i])
                i += 1
            bufs = bufs[i:]
            if sent:
                bufs[0] = memoryview(bufs[0])[sent:]
            i, n = 0, len(bufs)

    def _try_send_nowait(self, frames: list[bytes]) -> bool:
        """Send small frames (in one send) without ever blocking (receive threads use this)."""
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
            if self._seal is not None:
                seal = self._seal
                data = b"".join([b for f in frames for b in seal([f])])
            else:
                data = frames[0] if len(frames) == 1 else b"".join(frames)
            try:
                n = self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                if self.tx is not None:  # not sent: the writer sends them with these (the
                    # same frames, header tags only: no payload MAC's nonce is used twice)
                    self.tx.seq -= len(frames)
                return False
            self.last_tx = time.monotonic()
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
        if len(frame) == 1 and self._try_send_nowait(frame):
            return
        self._queue_replies([frame])

    def _queue_replies(self, frames: list[list[Any]]) -> None:
        for frame in frames:
            self._queue_reply(frame)

    def _queue_reply(self, frame: list[Any]) -> None:
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
        """Caller-thread fast path for a small chunk on an idle link (nothing in flight: else
        the chunk queues, and the writer sends queued small chunks together)."""
        if not self.alive or self.inflight or not self.send_lock.acquire(blocking=False):
            return False
        try:
            if not self._track(chunk):
                return False
            try:
                self._send_all([chunk.head, *chunk.payload])
            except OSError as exc:
                self.t._spawn(self.fail, exc)  # requeues the chunk with the rest of inflight
                return True
            t = chunk.wop.transfer
            if self._ep is not None and chunk.wop.remaining == 1 and t._pending == 1:
                t._reader = self  # its only reply comes on this link: its waiter may read it
            return True
        finally:
            self.send_lock.release()

    def _track(self, chunk: Chunk) -> bool:
        """Record a chunk as in flight on this link, unless the link already failed."""
        with self.lock:
            if not self.alive:
                return False
            self.inflight[(chunk.wop.op_id, chunk.idx)] = chunk
            return True

    def _next_item(self) -> tuple[str, Any] | None:
        links = self.links
        with self.cond:
            while True:
                if not self.alive:
                    return None
                if self.replies:
                    full = len(self.replies) >= MAX_REPLIES
                    frames = [self.replies.popleft()]
                    while (len(frames[0]) == 1 and self.replies and len(frames) < 64
                           and len(self.replies[0]) == 1):
                        frames.append(self.replies.popleft())  # small replies: one send
                    if full:
                        self.cond.notify_all()  # a receive thread may wait for room
                    return ("frames", frames)
                queue = links.queue if links is not None else None
                if queue and queue[0].nbytes <= SMALL and len(self.inflight) < SMALL_WINDOW:
                    # small frames queued behind each other go out together, in one send
                    batch = [queue.popleft()]
                    room = SMALL_WINDOW - len(self.inflight)
                    while queue and len(batch) < room and queue[0].nbytes <= SMALL:
                        batch.append(queue.popleft())
                    return ("batch", batch)
                if queue and len(self.inflight) < self.t.window:
                    # a bounded window per link: a slow link holds few chunks, so it never
                    # keeps the tail of a transfer waiting long after the fast links are done
                    return ("chunk", queue.popleft())
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
                    elif kind == "batch":
                        if not self._send_batch(obj):
                            return
                    elif kind == "frames" and len(obj) > 1:
                        self._send_frames(obj)
                    elif kind == "frames":
                        self._send_all(obj[0])
                    else:
                        self._send_all(obj)
        except (OSError, ValueError) as exc:
            self.fail(exc)

    def _send_batch(self, chunks: list[Chunk]) -> bool:
        """Send small chunks (each its own frame, MACed in order) with one ``sendmsg``; the send
        lock is held. False if the link failed before they were recorded (they are requeued)."""
        sending: list[Chunk] = []
        with self.lock:  # recorded as in flight together (what _track does for one)
            alive = self.alive
            if alive:
                inflight = self.inflight
                for chunk in chunks:
                    wop = chunk.wop
                    if not wop.transfer._done:  # a cancelled or timed-out op is not sent
                        inflight[(wop.op_id, chunk.idx)] = chunk
                        sending.append(chunk)
        if not alive:
            if self.links is not None:
                for c in reversed(chunks):
                    self.links.requeue(c)
            return False
        bufs: list[Any] = []
        seal = self._seal
        for chunk in sending:
            frame = [chunk.head, *chunk.payload]
            bufs += seal(frame) if seal is not None else frame
        if self.tail:
            tail, self.tail = self.tail, b""
            self.sock.sendall(tail)
        if bufs:
            self._send_bufs(bufs)
        return True

    def _send_frames(self, frames: list[list[Any]]) -> None:
        """Send queued small replies (header + ext each) with one ``sendmsg``."""
        seal = self._seal
        bufs: list[Any] = []
        for frame in frames:
            bufs += seal(frame) if seal is not None else frame
        if self.tail:
            tail, self.tail = self.tail, b""
            self.sock.sendall(tail)
        self._send_bufs(bufs)

    # -- reading: the receive thread, or the caller waiting for its reply ------------------

    def _poll_loop(self) -> None:
        """The receive thread of a dialled plain link: reads whatever no caller is reading."""
        ep = self._ep
        assert ep is not None
        poller = self.t.poller
        try:
            while self.alive:
                if poller is not None and poller.holding:
                    poller.hold_off(self)  # a caller's next wait will read this link
                try:
                    if not ep.poll(1.0):
                        continue
                except (OSError, ValueError):
                    return
                if not self.rlock.acquire(blocking=False):
                    # a caller reads this link now: hand the event back to it, then wait
                    # until it is done before polling again
                    self._rearm()
                    if self.rlock.acquire(timeout=1.0):
                        self.rlock.release()
                    continue
                try:
                    self._pump()
                finally:
                    self.rlock.release()
        finally:
            ep.close()

    def read_for(self, transfer: Any, timeout: float) -> None:
        """Read this link's frames in the calling thread until ``transfer`` is done, the link
        fails or ``timeout`` passes; returns at once if another thread is reading it. Saves
        the hand-off from the receive thread to the waiting caller (a thread wake-up)."""
        ep = self._ep
        if ep is None or not self.alive or not self.rlock.acquire(blocking=False):
            return
        try:
            deadline = time.monotonic() + timeout
            while not transfer._done and self.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    # short slices: a cancel or a timer from another thread is seen soon
                    events = ep.poll(min(left, 0.05))
                except (OSError, ValueError):
                    return
                if events:
                    self._pump()
        finally:
            self.rlock.release()

    def kick(self) -> None:
        """(A transfer this link's waiter reads for finished elsewhere: its poll slice is
        short, nothing to do.)"""

    def _pump(self) -> None:
        """Read frames (rlock held, epoll said the socket has data) until the read-ahead
        buffer is empty at a frame boundary; then re-arm the epoll for the next reader."""
        self._guarded(self._frames_buffered)
        self._rearm()

    def _frames_buffered(self) -> None:
        """The frames that came (at least one), then the acknowledgements they made."""
        self._frame()
        while self._rs < self._re:
            self._frame()
        if self._deferred:
            self._flush_deferred()

    def _rearm(self) -> None:
        if self._ep is not None and self.alive:
            try:
                self._ep.modify(self._fd, _ARM)
            except (OSError, ValueError):
                pass

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
        if self._shared and self.t.poller is not None:
            self.t.poller.remove(self)  # before the fd can be reused
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
        so a peer whose last op arrived does not see it fail. A polled link's reader may be
        between delivering a message and acknowledging it: wait for it to finish first."""
        if not self.alive:
            return
        reading = self._ep is not None and self.rlock.acquire(timeout=timeout)
        try:
            if not self.send_lock.acquire(timeout=timeout):
                return
            try:
                with self.cond:
                    frames = [[f] for f in self._pack_deferred()] if reading else []
                    frames += list(self.replies)
                    self.replies.clear()
                if reading:
                    self._deferred = []
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
        finally:
            if reading:
                self.rlock.release()

    def stalled(self, now: float, timeout: float) -> bool:
        """Work in flight, nothing moved on the link for ``timeout``, and the path is dead: no
        acknowledgement from the peer's kernel for ``timeout`` while it retransmits our bytes
        or probes the peer's zero window (more than the one probe a live peer leaves
        outstanding). A peer that is only slow (a starved or stopped process, a full receive
        buffer) still acknowledges at the TCP level: it is waited for, and each op's own
        deadline bounds the wait. Where every byte was already acknowledged, a PING goes out so
        that a dead return path shows up as a retransmitted segment."""
        if not self.inflight or now - max(self.last_rx, self.last_tx) <= timeout:
            return False
        path = tcp_path(self.sock)
        if path is None:
            return True  # no kernel view: no progress is all we know
        unacked, retransmits, probes, since_ack = path
        if unacked == 0 and now - self._probed > timeout:
            self._probed = now
            self.reply([w.pack_header(w.Op.PING)])
        return since_ack > timeout and ((unacked > 0 and retransmits > 0) or probes > 1)
