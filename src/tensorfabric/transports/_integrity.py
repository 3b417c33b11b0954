"""Per-frame integrity on a tcp link: a MAC under a per-connection key, with sequence numbers.

After the handshake each direction of a link has its own 32-byte key (derived from the cluster
secret and both sides' nonces, see ``_handshake``) and a frame counter that both ends keep
(never sent). A frame goes out as::

    header | ext | tag1 | payload | tag2 (only when there is a payload)

``d = BLAKE2b-384(key, seq || header || ext)``; ``tag1`` is its first 16 bytes, checked before
the receiver acts on the header (where a payload goes, which region, which op). The other 32
bytes are a one-time key for the payload's MAC, ``tag2``: Poly1305 (OpenSSL, through the
``cryptography`` package) for payloads from 4 KiB when both ends have it, else keyed BLAKE2b.
A relay without the secret can neither change, replay, reorder, drop-and-continue nor splice
frames: each tag is bound to its position in its connection's stream.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

TAG = 16
_D = 48  # tag1 + a 32-byte one-time payload key
_POLY_MIN = 4096  # below this, keyed BLAKE2b is cheaper than setting up Poly1305

_Poly1305: Any = None


def have_poly1305() -> bool:
    """Whether OpenSSL's Poly1305 is available (the ``integrity`` extra); imported on first
    use, so ``import tensorfabric`` does not load ``cryptography``."""
    global _Poly1305
    if _Poly1305 is None:
        try:
            from cryptography.hazmat.primitives.poly1305 import Poly1305
        except ImportError:
            _Poly1305 = False
        else:
            _Poly1305 = Poly1305
    return _Poly1305 is not False


#: payloads from this size are MACed on a helper thread while the socket moves the bytes
#: (Poly1305 and hashlib's BLAKE2b release the GIL), so hashing overlaps sending/receiving
OVERLAP_MIN = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def background(fn: Any, *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` on the shared MAC helper threads."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tf-mac")
    return _pool.submit(fn, *args)


class _Blake:
    __slots__ = ("h",)

    def __init__(self, key: bytes) -> None:
        self.h = hashlib.blake2b(key=key, digest_size=TAG)

    def update(self, data: Any) -> None:
        self.h.update(data)

    def finalize(self) -> bytes:
        return self.h.digest()


class FrameMac:
    """One direction of one link: its key and frame counter."""

    __slots__ = ("_base", "seq", "poly")

    def __init__(self, key: bytes, poly: bool) -> None:
        self._base = hashlib.blake2b(key=key, digest_size=_D)
        self.seq = 0
        self.poly = poly and have_poly1305()

    def head(self, head: bytes | bytearray | memoryview) -> bytes:
        """The 48-byte digest of the current frame's header and ext (advances the counter)."""
        h = self._base.copy()
        h.update(self.seq.to_bytes(8, "little"))
        h.update(head)
        self.seq += 1
        return h.digest()

    def payload(self, d: bytes, nbytes: int) -> Any:
        """A MAC for this frame's payload (``update(...)``, ``finalize()``)."""
        if self.poly and nbytes >= _POLY_MIN:
            return _Poly1305(d[TAG:])
        return _Blake(d[TAG:])

    def seal(self, bufs: list[Any]) -> list[Any]:
        """A frame (``[header + ext, *payload]``) with its tags, ready to send."""
        head, tail = self.seal_async(bufs)
        return head + [tail.result() if isinstance(tail, Future) else tail]

    def seal_async(self, bufs: list[Any]) -> tuple[list[Any], bytes | Future[bytes]]:
        """The frame up to its payload, and its last tag (or a future of it, computed on a
        helper thread while the caller sends the rest). No payload: no last tag (b"")."""
        d = self.head(bufs[0])
        if len(bufs) == 1:
            return [bufs[0], d[:TAG]], b""
        payload = bufs[1:]
        nbytes = sum(memoryview(b).nbytes for b in payload)
        m = self.payload(d, nbytes)
        if nbytes >= OVERLAP_MIN:
            return [bufs[0], d[:TAG], *payload], background(_digest, m, payload)
        return [bufs[0], d[:TAG], *payload], _digest(m, payload)

    @staticmethod
    def same(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
        return hmac.compare_digest(a, b)


def _digest(m: Any, parts: list[Any]) -> bytes:
    for b in parts:
        m.update(b)
    result: bytes = m.finalize()
    return result


__all__ = ["FrameMac", "OVERLAP_MIN", "TAG", "background", "have_poly1305"]
