"""Per-frame integrity on a tcp link: a MAC under a per-connection key, with sequence numbers.

After the handshake each direction of a link has its own 32-byte key (derived from the cluster
secret and both sides' nonces, see ``_handshake``) and a frame counter that both ends keep
(never sent). A frame goes out as::

    header | ext | tag1 | payload | tag2 (only when there is a payload)

``d = BLAKE2b-384(key, seq || header || ext)``; ``tag1`` is its first 16 bytes, checked before
the receiver acts on the header (where a payload goes, which region, which op). The other 32
bytes are a one-time key for the payload's MAC, ``tag2``, for payloads from 4 KiB: GMAC
(AES-256-GCM under that key with the payload as associated data and nothing encrypted; the
key is never reused, so a fixed nonce is safe) when both ends have it, else Poly1305 (a peer
of an earlier version), both OpenSSL through the ``cryptography`` package; smaller payloads,
or a peer without ``cryptography``, use keyed BLAKE2b. GMAC is the fastest of these on CPUs
with AES-NI and carry-less multiply (23 GB/s per core here against Poly1305's 13, see
docs/benchmarks.md), which is what a large write's cost is made of.
A relay without the secret can neither change, replay, reorder, drop-and-continue nor splice
frames: each tag is bound to its position in its connection's stream.

The sender MACs a frame's whole payload, then sends the frame with one ``sendmsg``; the
receiver MACs each piece as it lands (in its own thread, no hand-off: on a loaded machine a
helper thread's wake-up costs more than it saves).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

TAG = 16
_D = 48  # tag1 + a 32-byte one-time payload key
_POLY_MIN = 4096  # below this, keyed BLAKE2b is cheaper than setting up GMAC or Poly1305

_Poly1305: Any = None
_AESGCM: Any = None
_GCM: Any = None
_IV = bytes(12)  # GMAC's nonce: fixed, as every frame has its own one-time key


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


def have_gmac() -> bool:
    """Whether OpenSSL's AES-GCM is available (the ``integrity`` extra), for GMAC."""
    global _AESGCM, _GCM
    if _AESGCM is None:
        try:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            _AESGCM = False
        else:
            _AESGCM = AESGCM
            _GCM = lambda key: Cipher(algorithms.AES(key), modes.GCM(_IV)).encryptor()  # noqa: E731
    return _AESGCM is not False


class _Blake:
    __slots__ = ("h",)

    def __init__(self, key: bytes) -> None:
        self.h = hashlib.blake2b(key=key, digest_size=TAG)

    def update(self, data: Any) -> None:
        self.h.update(data)

    def finalize(self) -> bytes:
        return self.h.digest()


class _Gmac:
    """GMAC of a payload of ``nbytes``: one call when the payload comes in one piece (the
    common case), else OpenSSL's streaming GCM over the pieces."""

    __slots__ = ("key", "nbytes", "seen", "tag", "enc")

    def __init__(self, key: bytes, nbytes: int) -> None:
        self.key, self.nbytes, self.seen = key, nbytes, 0
        self.tag: bytes | None = None
        self.enc: Any = None

    def update(self, data: Any) -> None:
        data = memoryview(data)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        n = data.nbytes
        if self.tag is not None:  # more than declared: never matches
            self.tag = b"" if n else self.tag
            return
        if self.enc is None and self.seen == 0 and n == self.nbytes:
            self.tag = _AESGCM(self.key).encrypt(_IV, b"", data)
        else:
            if self.enc is None:
                self.enc = _GCM(self.key)
            self.enc.authenticate_additional_data(data)
        self.seen += n

    def finalize(self) -> bytes:
        if self.tag is not None:
            return self.tag
        if self.enc is None:
            return bytes(_AESGCM(self.key).encrypt(_IV, b"", b""))
        self.enc.finalize()
        return bytes(self.enc.tag)


class FrameMac:
    """One direction of one link: its key and frame counter. ``poly``/``gmac``: the payload
    MAC both ends agreed on in the handshake (GMAC first)."""

    __slots__ = ("_base", "seq", "poly", "gmac")

    def __init__(self, key: bytes, poly: bool, gmac: bool = False) -> None:
        self._base = hashlib.blake2b(key=key, digest_size=_D)
        self.seq = 0
        self.gmac = gmac and have_gmac()
        self.poly = poly and have_poly1305()

    def head(self, head: bytes | bytearray | memoryview) -> bytes:
        """The 48-byte digest of the current frame's header and ext (advances the counter)."""
        h = self._base.copy()
        h.update(self.seq.to_bytes(8, "little"))
        h.update(head)
        self.seq += 1
        return h.digest()

    def payload(self, d: bytes, nbytes: int) -> Any:
        """A MAC for this frame's payload (``update(...)`` over its bytes in order, then
        ``finalize()``)."""
        if nbytes >= _POLY_MIN:
            if self.gmac:
                return _Gmac(d[TAG:], nbytes)
            if self.poly:
                return _Poly1305(d[TAG:])
        return _Blake(d[TAG:])

    def seal(self, bufs: list[Any]) -> list[Any]:
        """A frame (``[header + ext, *payload]``) with its tags, ready to send in one go."""
        d = self.head(bufs[0])
        if len(bufs) == 1:
            return [bufs[0], d[:TAG]]
        if len(bufs) == 2:  # one piece (every small write): its tag in one call
            return [bufs[0], d[:TAG], bufs[1], self.tag_of(d, bufs[1])]
        payload = bufs[1:]
        m = self.payload(d, sum(memoryview(b).nbytes for b in payload))
        for b in payload:
            m.update(b)
        return [bufs[0], d[:TAG], *payload, m.finalize()]

    def tag_of(self, d: bytes, data: Any) -> bytes:
        """The payload MAC of :meth:`payload` over ``data`` in one piece, in one call."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        key = d[TAG:]
        if view.nbytes >= _POLY_MIN:
            if self.gmac:
                return _AESGCM(key).encrypt(_IV, b"", view)
            if self.poly:
                return _Poly1305.generate_tag(key, view)
        return hashlib.blake2b(view, key=key, digest_size=TAG).digest()

    def native_parts(self) -> tuple[Any, ...]:
        """What ``_native.take_writes`` needs to check this direction's frames in C: this
        object (its ``seq``), the keyed BLAKE2b base, and the payload MACs :meth:`payload`
        picks from (AESGCM or None, Poly1305 or None, from ``_POLY_MIN`` bytes; BLAKE2b below).
        The C loop applies the same rule; tests/unit/test_native_rx.py checks each kind."""
        return (self, self._base, hashlib.blake2b, _AESGCM if self.gmac else None,
                _Poly1305 if self.poly else None, _POLY_MIN)

    #: constant-time comparison of two tags (a C function: no Python frame per check)
    same = staticmethod(hmac.compare_digest)


