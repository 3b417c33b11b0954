"""The TCP link handshake: the cluster-secret check both sides run before a link carries frames."""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

from .. import _auth
from .._address import EngineAddress
from .._errors import AuthenticationError, BrokenError, ProtocolError

if TYPE_CHECKING:
    from ._tcp import TcpTransport

IOV_MAX = 1024
_HELLO = struct.Struct("<4s16s16s32sII")  # magic, my id, wanted id, nonce, link index, addr len
_REPLY = struct.Struct("<4s16s32s32s")  # magic, my id, nonce, mac


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


def accept(t: TcpTransport, sock: socket.socket) -> tuple[socket.socket, EngineAddress, int]:
    """Run the acceptor's side; returns the (maybe TLS-wrapped) socket, the peer, the link index."""
    sock.settimeout(t.connect_timeout)
    _set_keepalive(sock)
    if t.tls_server is not None:
        sock = t.tls_server.wrap_socket(sock, server_side=True)
    magic, their_id, wanted, their_nonce, index, alen = _HELLO.unpack(
        _recv_exact(sock, _HELLO.size))
    if magic != b"tfH1" or alen > 65536:
        raise ProtocolError("not a tensorfabric peer")
    peer = EngineAddress.from_bytes(_recv_exact(sock, alen))
    if peer.engine_id != their_id:
        raise ProtocolError("hello names two different engines")
    if wanted != t.engine_id:
        sock.sendall(b"tfNO" + b"\0" * (_REPLY.size - 4))
        raise ProtocolError("peer dialled a different engine at this address")
    nonce = _auth.new_nonce()
    ids = their_id + t.engine_id
    mac = _auth.prove(t.secret, b"A", their_nonce, nonce, ids)
    sock.sendall(_REPLY.pack(b"tfH1", t.engine_id, nonce, mac))
    their_mac = _recv_exact(sock, _auth.MAC_BYTES)
    if not _auth.check(_auth.prove(t.secret, b"D", nonce, their_nonce, ids), their_mac):
        sock.sendall(b"NO\0\0")
        raise AuthenticationError(f"peer {peer} failed the cluster-secret check")
    sock.sendall(b"OK\0\0")
    sock.settimeout(None)
    return sock, peer, index


def dial(t: TcpTransport, peer: EngineAddress, i: int) -> socket.socket:
    """Connect link ``i`` to ``peer`` and run the dialer's side; returns the ready socket."""
    assert t.address is not None
    host, port = peer.endpoints[i % len(peer.endpoints)]
    local = t.link_addrs[i]
    sock = socket.create_connection((host, port), timeout=t.connect_timeout,
                                    source_address=(local, 0) if local else None)
    try:
        _set_keepalive(sock)
        if t.tls_client is not None:
            sock = t.tls_client.wrap_socket(sock, server_hostname=host)
        nonce = _auth.new_nonce()
        me = t.address.to_bytes()
        sock.sendall(_HELLO.pack(b"tfH1", t.engine_id, peer.engine_id, nonce, i, len(me)) + me)
        magic, their_id, their_nonce, their_mac = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
        if magic == b"tfNO":
            raise BrokenError(f"{host}:{port} is a different engine than {peer}", peer=str(peer))
        ids = t.engine_id + peer.engine_id
        if magic != b"tfH1" or their_id != peer.engine_id or not _auth.check(
                _auth.prove(t.secret, b"A", nonce, their_nonce, ids), their_mac):
            raise AuthenticationError(
                f"peer {peer} could not prove the cluster secret: the engines were given "
                "different secrets", peer=str(peer))
        sock.sendall(_auth.prove(t.secret, b"D", their_nonce, nonce, ids))
        verdict = _recv_exact(sock, 4)
        if verdict != b"OK\0\0":
            raise AuthenticationError(
                f"peer {peer} rejected this engine's cluster secret: the engines were given "
                "different secrets", peer=str(peer))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock
