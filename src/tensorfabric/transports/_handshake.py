"""The TCP link handshake: the cluster-secret check both sides run before a link carries frames.

1. dialer -> acceptor: hello (engine ids, a fresh nonce, link index, flags, the dialer's address)
2. acceptor -> dialer: reply (its id, a fresh nonce, the agreed flags); no MAC yet
3. dialer -> acceptor: HMAC(secret, "dialer proof" || H(transcript))
4. acceptor -> dialer: OK and HMAC(secret, "acceptor proof" || H(transcript)), or NO

The transcript is every byte of 1 and 2 (so the address, ids, link index and flags are covered)
and, on TLS, the channel's tls-unique binding (a terminating relay sees two different channels).
Both nonces are in before anyone proves anything, and the acceptor proves nothing until the
dialer has: an unauthenticated client gets no MAC to guess the secret from offline. Each
direction's frame key is derived from the same transcript (``_integrity``). The whole handshake
has one deadline (``connect_timeout``), not one per read.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, NamedTuple

from .. import _auth
from .._address import EngineAddress
from .._errors import AuthenticationError, BrokenError, ProtocolError
from ._integrity import FrameMac, have_gmac, have_poly1305

if TYPE_CHECKING:
    from ._tcp import TcpTransport

IOV_MAX = 1024
_MAGIC = b"tfH2"
_HELLO = struct.Struct("<4s16s16s32sIII")  # magic, my id, wanted id, nonce, link, flags, addr len
_REPLY = struct.Struct("<4s16s32sI")  # magic, my id, nonce, flags
_VERDICT = struct.Struct("<4s32s")  # b"OK\0\0" + the acceptor's proof, or b"NO\0\0" + zeros
MAX_ADDRESS = 16 << 10  # an engine address in a hello (one endpoint per NIC: a few hundred bytes)
F_INTEGRITY = 1  # hello: this side wants frame MACs; reply: they are on
F_POLY1305 = 2  # hello: this side has Poly1305; reply: payload MACs use it
F_GMAC = 4  # hello: this side has AES-GCM; reply: payload MACs use GMAC (before Poly1305)
F_ACKS = 8  # hello: this side reads ACKS frames; reply: the acceptor sends its OK ACKs in them
F_GMAC_SEQ = 16  # hello: this side has counter GMAC; reply: payload MACs use it (before F_GMAC)

class _PeerGone(Exception):
    """Internal: the connection ended (EOF, reset, or closed by us)."""


def _set_keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


class Session(NamedTuple):
    """What a finished handshake gives a link."""

    sock: socket.socket
    peer: EngineAddress
    link: int
    tx: FrameMac | None  # MACs our frames (None: integrity off, or TLS carries it)
    rx: FrameMac | None  # checks the peer's frames
    acks: bool = False  # the acceptor acknowledges with ACKS frames (both sides agreed)


def _recv_by(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Receive exactly ``n`` bytes before ``deadline`` (the whole handshake's, not per read)."""
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("handshake deadline passed")
        sock.settimeout(left)
        got = sock.recv_into(view)
        if got == 0:
            raise _PeerGone("connection closed during handshake")
        view = view[got:]
    return bytes(buf)


def _binding(sock: socket.socket) -> bytes:
    """The TLS channel both ends share (tls-unique), so a terminating relay cannot pass."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            return sock.get_channel_binding("tls-unique") or b""
        except (ValueError, ssl.SSLError):
            return b""
    return b""


def _keys(secret: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(dialer's proof, acceptor's proof, dialer->acceptor key, acceptor->dialer key)."""
    h = hashlib.sha256(transcript).digest()

    def mac(label: bytes) -> bytes:
        return hmac.new(secret, b"tensorfabric/2 " + label + h, hashlib.sha256).digest()

    return mac(b"dialer proof"), mac(b"acceptor proof"), mac(b"key d->a"), mac(b"key a->d")


def _macs(mode: int, tls_bound: bool, send_key: bytes, recv_key: bytes
          ) -> tuple[FrameMac | None, FrameMac | None]:
    if not mode & F_INTEGRITY or tls_bound:
        return None, None
    poly, gmac, seq = bool(mode & F_POLY1305), bool(mode & F_GMAC), bool(mode & F_GMAC_SEQ)
    return FrameMac(send_key, poly, gmac, seq), FrameMac(recv_key, poly, gmac, seq)


def _my_flags(t: TcpTransport) -> int:
    return ((F_INTEGRITY if t.integrity else 0) | (F_POLY1305 if have_poly1305() else 0)
            | ((F_GMAC | F_GMAC_SEQ) if have_gmac() else 0) | F_ACKS)


def accept(t: TcpTransport, sock: socket.socket, deadline: float, src: str) -> Session:
    """Run the acceptor's side. Nothing this side sends before the dialer has proved the
    secret depends on the secret, so an unauthenticated client learns nothing to guess at."""
    _set_keepalive(sock)
    if t.tls_server is not None:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        sock = t.tls_server.wrap_socket(sock, server_side=True)
    hello = _recv_by(sock, _HELLO.size, deadline)
    magic, their_id, wanted, their_nonce, index, flags, alen = _HELLO.unpack(hello)
    if magic != _MAGIC or alen > MAX_ADDRESS or index > 0xFFFF:
        raise ProtocolError("not a tensorfabric peer (or an incompatible version)")
    addr = _recv_by(sock, alen, deadline)
    peer = EngineAddress.from_bytes(addr)
    if peer.engine_id != their_id:
        raise ProtocolError("hello names two different engines")
    if wanted != t.engine_id:
        sock.sendall(b"tfNO" + b"\0" * (_REPLY.size - 4))
        raise ProtocolError("peer dialled a different engine at this address")
    mode = (F_INTEGRITY if (flags | _my_flags(t)) & F_INTEGRITY else 0) | \
        (flags & _my_flags(t) & (F_POLY1305 | F_GMAC | F_GMAC_SEQ | F_ACKS))
    reply = _REPLY.pack(_MAGIC, t.engine_id, _auth.new_nonce(), mode)
    sock.sendall(reply)
    binding = _binding(sock)
    dialer_proof, acceptor_proof, d2a, a2d = _keys(t.secret, hello + addr + reply + binding)
    their_proof = _recv_by(sock, _auth.MAC_BYTES, deadline)
    if not _auth.check(dialer_proof, their_proof):
        # a source that keeps failing waits longer for each answer (online guessing is slow)
        time.sleep(min(t.gate.failed(src), max(0.0, deadline - time.monotonic())))
        sock.sendall(_VERDICT.pack(b"NO\0\0", b""))
        raise AuthenticationError(f"peer {peer} failed the cluster-secret check")
    sock.sendall(_VERDICT.pack(b"OK\0\0", acceptor_proof))
    sock.settimeout(None)
    tx, rx = _macs(mode, bool(binding), a2d, d2a)
    return Session(sock, peer, index, tx, rx, bool(mode & F_ACKS))


def dial(t: TcpTransport, peer: EngineAddress, i: int) -> Session:
    """Connect link ``i`` to ``peer`` and run the dialer's side."""
    assert t.address is not None
    host, port = peer.endpoints[i % len(peer.endpoints)]
    local = t.link_addrs[i]
    deadline = time.monotonic() + t.connect_timeout
    sock = socket.create_connection((host, port), timeout=t.connect_timeout,
                                    source_address=(local, 0) if local else None)
    try:
        _set_keepalive(sock)
        if t.tls_client is not None:
            sock = t.tls_client.wrap_socket(sock, server_hostname=host)
        me = t.address_bytes
        hello = _HELLO.pack(_MAGIC, t.engine_id, peer.engine_id, _auth.new_nonce(), i,
                            _my_flags(t), len(me))
        sock.sendall(hello + me)
        reply = _recv_by(sock, _REPLY.size, deadline)
        magic, their_id, _, mode = _REPLY.unpack(reply)
        if magic == b"tfNO":
            raise BrokenError(f"{host}:{port} is a different engine than {peer}", peer=str(peer))
        if magic != _MAGIC or their_id != peer.engine_id:
            raise AuthenticationError(f"{host}:{port} did not answer as engine {peer} (or runs "
                                      "an incompatible tensorfabric version)", peer=str(peer))
        if t.integrity and not mode & F_INTEGRITY:
            raise AuthenticationError(f"peer {peer} turned frame integrity off", peer=str(peer))
        binding = _binding(sock)
        dialer_proof, acceptor_proof, d2a, a2d = _keys(t.secret, hello + me + reply + binding)
        sock.sendall(dialer_proof)
        verdict, their_proof = _VERDICT.unpack(_recv_by(sock, _VERDICT.size, deadline))
        if verdict != b"OK\0\0":
            raise AuthenticationError(
                f"peer {peer} rejected this engine's cluster secret: the engines were given "
                "different secrets (or a relay sits between them)", peer=str(peer))
        if not _auth.check(acceptor_proof, their_proof):
            raise AuthenticationError(
                f"peer {peer} could not prove the cluster secret: the engines were given "
                "different secrets (or a relay sits between them)", peer=str(peer))
        sock.settimeout(None)
    except (TimeoutError, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError) as exc:
        # the peer is there (it accepted) but the handshake was cut off or ran out of time:
        # on a loaded machine either side may miss the deadline once; the caller may retry
        sock.close()
        raise _PeerGone(f"handshake cut off ({exc})") from exc
    except BaseException:
        sock.close()
        raise
    tx, rx = _macs(mode, bool(binding), d2a, a2d)
    return Session(sock, peer, i, tx, rx, bool(mode & F_ACKS))
