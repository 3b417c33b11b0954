"""TCP: several authenticated links per peer, large ops striped across them.

Each link is one TCP connection with a receive thread and a writer thread. A peer's chunks
wait in one queue shared by its links: a writer takes the next chunk when its socket has
taken the last one, so faster links carry more (work stealing). Payloads are received with
``recv_into`` straight into the destination region. Receive threads never block on sending
(acknowledgements go out with MSG_DONTWAIT or through the writer), so two engines writing to
each other at full speed cannot deadlock. Small ops take a shorter path (see ``_link``): sent
from the caller's thread on an idle link, batched behind an op in flight, and their replies
read by the caller waiting for them.

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

from .. import _wire as w
from .._address import EngineAddress
from .._errors import ClosedError, TensorFabricError
from .._ops import DEFAULT_CHUNK, Chunk, WireOp, read_chunks, write_chunks
from .._region import RegionDescriptor
from . import _handshake
from ._base import InboundHandler, Transport
from ._gate import PreAuthGate
from ._handshake import _HELLO, _REPLY, _PeerGone
from ._link import Conn
from ._peers import PeerLinks
from ._poller import Poller
from ._poller import available as poller_available

log = logging.getLogger("tensorfabric.tcp")

MAX_LINKS_PER_PEER = 256  # links one authenticated peer may hold open to us at once


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
        integrity: bool = True,
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
        self.integrity = integrity  # frame MACs (off only when every engine turns them off)
        self.gate = PreAuthGate(connect_timeout)
        self.address: EngineAddress | None = None  # set by the engine once endpoints are known
        self.address_bytes = b""
        self._lock = threading.Lock()
        self._peers: dict[bytes, PeerLinks] = {}
        self._accepted: set[Conn] = set()
        #: peers whose last accepted link closed, and when (forgotten after a grace)
        self._gone: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._delivered: collections.OrderedDict[tuple[bytes, int], None] = \
            collections.OrderedDict()  # recent (peer, op) of messages, to drop resent copies
        self._closed = False
        #: shared-memory hooks (set by the shm transport): a peer revoked one of its regions
        #: that we mapped; a peer acknowledged our revocation; a peer was forgotten
        self.on_shm_revoke: Callable[[bytes, int], None] | None = None
        self.on_shm_revoked: Callable[[int], None] = lambda op_id: None
        self.on_peer_forgotten: list[Callable[[bytes], None]] = []
        #: accepted plain links are read through one shared epoll (see ``_poller``)
        self.poller: Poller | None = None
        if tls_server is None and poller_available():
            self.poller = Poller()
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
            if self.poller is not None:
                self.poller.close()
                self.poller.release()
            raise

    def start(self, address: EngineAddress) -> None:
        self.address = address
        self.address_bytes = address.to_bytes()
        for ls in self._listeners:
            self._spawn(self._accept_loop, ls)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        th = threading.Thread(target=fn, args=args, daemon=True, name="tf-tcp")
        th.start()
        return th

    # -- connection setup ---------------------------------------------------------------

    def _accept_loop(self, ls: socket.socket) -> None:
        """Accept forever: a full fd table, a failed thread start or a bug backs off and
        retries (logged), it never ends the loop; only close() does."""
        backoff = 0.01
        while not self._closed:
            try:
                sock, addr = ls.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("accepting a connection failed (%s); retrying in %.2f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.01
            try:
                src = str(addr[0]) if isinstance(addr, tuple) else "?"
                deadline = self.gate.admit(sock, src)
                if deadline is None:
                    sock.close()
                    continue
                self._spawn(self._handshake_accept, sock, src, deadline)
            except Exception:  # e.g. no thread could be started: drop this one, keep going
                log.exception("could not start a handshake")
                self.gate.done(sock)
                sock.close()

    def _handshake_accept(self, sock: socket.socket, src: str, deadline: float) -> None:
        raw = sock
        try:
            session = _handshake.accept(self, sock, deadline, src)
        except Exception as exc:  # noqa: BLE001 - whatever an unauthenticated peer caused
            if not isinstance(exc, (OSError, _PeerGone, TensorFabricError, struct.error)):
                log.exception("handshake with %s failed unexpectedly", src)
            else:
                log.warning("rejected incoming connection from %s: %s", src, exc)
            self.gate.done(raw)
            try:
                sock.close()
            except OSError:
                pass
            return
        self.gate.done(raw)
        conn = Conn(self, session, dialer=False, peer_links=None)
        with self._lock:
            mine = sum(1 for c in self._accepted if c.peer.engine_id == session.peer.engine_id)
            if self._closed or mine >= MAX_LINKS_PER_PEER:
                session.sock.close()
                return
            self._accepted.add(conn)
        conn.start()

    def _dial(self, peer: EngineAddress, i: int, links: PeerLinks) -> Conn:
        if self._closed:
            raise ClosedError("engine is closed")
        return Conn(self, _handshake.dial(self, peer, i), dialer=True, peer_links=links)

    def peer_links(self, peer: EngineAddress) -> PeerLinks:
        links = self._peers.get(peer.engine_id)  # the per-op path: a dict read, no lock
        if links is not None and not links.closed and not self._closed:
            return links
        with self._lock:
            if self._closed:
                raise ClosedError("engine is closed")
            links = self._peers.get(peer.engine_id)
            if links is None or links.closed:  # closed: forgotten, start afresh
                links = self._peers[peer.engine_id] = PeerLinks(self, peer)
        return links

    def first_delivery(self, key: tuple[bytes, int]) -> bool:
        """True the first time a message (peer id, op id) arrives; False for a resent copy."""
        with self._lock:
            if key in self._delivered:
                return False
            self._delivered[key] = None
            if len(self._delivered) > 1 << 16:
                self._delivered.popitem(last=False)
            return True

    def forget_delivery(self, key: tuple[bytes, int]) -> None:
        with self._lock:
            self._delivered.pop(key, None)

    def forget_links(self, links: PeerLinks, error: BaseException) -> None:
        """Drop a peer gone past its grace; tell the listeners (shm mappings, the engine)."""
        with self._lock:
            if self._peers.get(links.peer.engine_id) is not links:
                return
            del self._peers[links.peer.engine_id]
        links.close(error)
        self._peer_gone(links.peer.engine_id)

    def _peer_gone(self, peer_id: bytes) -> None:
        with self._lock:
            if peer_id in self._peers or any(c.peer.engine_id == peer_id for c in self._accepted):
                return  # still linked one way or the other
        for hook in list(self.on_peer_forgotten):
            try:
                hook(peer_id)
            except Exception:
                log.exception("forgetting peer failed")

    def accepted_from(self, peer_id: bytes) -> Conn | None:
        """A live link this peer dialled to us (the way to tell it something unasked)."""
        with self._lock:
            for c in self._accepted:
                if c.alive and c.peer.engine_id == peer_id:
                    return c
        return None

    def _forget_accepted(self, conn: Conn) -> None:
        with self._lock:
            self._accepted.discard(conn)
            pid = conn.peer.engine_id
            if not any(c.peer.engine_id == pid for c in self._accepted):
                self._gone[pid] = time.monotonic()  # forgotten unless it links again in time
                while len(self._gone) > 1 << 16:
                    self._gone.popitem(last=False)

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
        self.peer_links(peer).submit(chunks)

    def tick(self, now: float) -> None:
        self.gate.reap(now)
        with self._lock:
            peers = list(self._peers.values())
            grace = self.reconnect_grace + self.link_timeout + self.connect_timeout
            gone = [p for p, t0 in self._gone.items() if now - t0 > grace]
            for p in gone:
                del self._gone[p]
        for links in peers:
            links.tick(now)
        for p in gone:
            self._peer_gone(p)

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
        self.gate.close()
        err = ClosedError("engine closed")
        if self.poller is not None:
            self.poller.close()
        for c in accepted:
            c.flush_replies(0.5)
        for p in peers:
            p.close(err)
        for c in accepted:
            c.fail(err)
        if self.poller is not None:
            self.poller.release()


__all__ = ["TcpTransport", "Conn", "PeerLinks", "_HELLO", "_REPLY"]
