"""A hand-made client that knows the secret, speaks the handshake, then sends anything (for
the security tests). Frames can be sent sealed (with valid MACs) or raw."""

from __future__ import annotations

import socket
from typing import Any

import tensorfabric as tf
from tensorfabric import _auth
from tensorfabric._address import EngineAddress
from tensorfabric.transports._handshake import (
    _HELLO,
    _MAGIC,
    _REPLY,
    _VERDICT,
    F_GMAC,
    F_GMAC_SEQ,
    F_INTEGRITY,
    F_POLY1305,
    _keys,
)
from tensorfabric.transports._integrity import FrameMac, have_poly1305


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise ConnectionError("closed")
        data += got
    return data


class RawPeer:
    def __init__(self, target: tf.Engine | bytes, secret: str, *, integrity: bool = True,
                 engine_id: bytes = b"R" * 16, address: bytes | None = None, link: int = 0,
                 timeout: float = 5.0, source: str | None = None, flags: int = 0) -> None:
        """``flags``: more hello flags (e.g. ``F_ACKS``); ``self.mode``: what the engine agreed."""
        addr = EngineAddress.from_bytes(target.address if isinstance(target, tf.Engine)
                                        else target)
        me = address or EngineAddress(engine_id, "raw", (("127.0.0.1", 1),)).to_bytes()
        self.sock = socket.create_connection(addr.endpoints[0], timeout=timeout,
                                             source_address=(source, 0) if source else None)
        flags |= (F_INTEGRITY if integrity else 0) | (F_POLY1305 if have_poly1305() else 0)
        hello = _HELLO.pack(_MAGIC, engine_id, addr.engine_id, _auth.new_nonce(), link, flags,
                            len(me))
        self.sock.sendall(hello + me)
        reply = recv_exact(self.sock, _REPLY.size)
        _, _, _, mode = _REPLY.unpack(reply)
        self.mode = mode
        proof, their, d2a, a2d = _keys(secret.encode(), hello + me + reply)
        self.sock.sendall(proof)
        verdict, their_proof = _VERDICT.unpack(recv_exact(self.sock, _VERDICT.size))
        self.ok = verdict == b"OK\0\0" and their_proof == their
        self.verdict, self.their_proof = verdict, their_proof
        self.tx = self.rx = None
        if mode & F_INTEGRITY:
            poly, gmac, seq = bool(mode & F_POLY1305), bool(mode & F_GMAC), bool(mode & F_GMAC_SEQ)
            self.tx, self.rx = FrameMac(d2a, poly, gmac, seq), FrameMac(a2d, poly, gmac, seq)

    def seal(self, head_ext: bytes, payload: bytes = b"") -> bytes:
        """The bytes of one frame with valid tags (the next sequence number)."""
        if self.tx is None:
            return head_ext + payload
        parts: list[Any] = [head_ext, payload] if payload else [head_ext]
        return b"".join(bytes(p) for p in self.tx.seal(parts))

    def send(self, head_ext: bytes, payload: bytes = b"") -> None:
        self.sock.sendall(self.seal(head_ext, payload))

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        return closed(self.sock, timeout)


def closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the engine has closed this connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
