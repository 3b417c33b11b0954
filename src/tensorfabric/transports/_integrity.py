"""Per-frame integrity on a tcp link: a MAC under a per-connection key, with sequence numbers.

After the handshake each direction of a link has its own 32-byte key (derived from the cluster
secret and both sides' nonces, see ``_handshake``) and a frame counter that both ends keep
(never sent). A frame goes out as::

    header | ext | tag1 | payload | tag2 (only when there is a payload)

``d = BLAKE2b-384(key, seq || header || ext)``; ``tag1`` is its first 16 bytes, checked before
the receiver acts on the header (where a payload goes, which region, which op). ``tag2`` is the
payload's MAC, in one of these modes (the handshake agrees on the first both ends have):

* **counter GMAC** (``F_GMAC_SEQ``, the default) for payloads from 256 B: GMAC (AES-256-GCM
  with the payload as associated data and nothing encrypted) under a per-direction key derived
  from the link key, with the frame's counter as the nonce. The counter never repeats under a
  key (keys are fresh per connection), which is all GCM asks of a nonce; the key object is made
  once per link, so a frame pays for the hash and one call (about 11,000 instructions for
  4 KiB, against 19,500 under a one-time key and 19,400 for keyed BLAKE2b over 1 KiB). Smaller
  payloads: keyed BLAKE2b under the other 32 bytes of ``d``, a one-time key (cheaper there).
* **one-time-key GMAC or Poly1305** (``F_GMAC``/``F_POLY1305``, a peer of an earlier version):
  the other 32 bytes of ``d`` are a one-time key for GMAC (a fixed nonce is safe as the key is
  never reused) or Poly1305 over payloads from 4 KiB; keyed BLAKE2b under that key below.
* **keyed BLAKE2b** under the one-time key, for every payload (no ``cryptography``).

All through OpenSSL (the ``cryptography`` package) or hashlib. GMAC is the fastest of these on
CPUs with AES-NI and carry-less multiply (23 GB/s per core here against Poly1305's 13, see
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
_SEQ_MIN = 256  # below this, keyed BLAKE2b is cheaper than counter GMAC (bench/mac_instr.py)

_Poly1305: Any = None
_AESGCM: Any = None
_GCM: Any = None
_IV = bytes(12)  # one-time-key GMAC's nonce: fixed, as every frame has its own key
#: the layout of FrameMac.native_parts() that tensorfabric._native's MAC_PARTS must equal
NATIVE_PARTS = 2


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
            _GCM = lambda key, iv: (  # noqa: E731
                Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor())
    return _AESGCM is not False


class _Blake:
    __slots__ = ("h",)

    def __init__(self, key: bytes) -> None:
        self.h = hashlib.blake2b(key=key, digest_size=TAG)

    def update(self, data: Any) -> None:
        self.h.update(data)

    def finalize(self) -> bytes:
        return self.h.digest()


_GATHER = 64 << 10  # a payload up to this size that comes in pieces is MACed in one call
_JOIN_MIN = 8  # a frame of more pieces than this, ...
_JOIN_AVG = 64 << 10  # ... of at most this many bytes each on average, is sealed joined


class _Gmac:
    """GMAC of a payload of ``nbytes``: one call when the payload comes in one piece (the
    common case) or, up to ``_GATHER`` bytes, in pieces gathered first (a message's payload
    read around its header: OpenSSL's streaming GCM object costs more to set up than the
    copy), else OpenSSL's streaming GCM over the pieces. ``aead``: an AESGCM under ``key``
    (made here when None), ``iv``: the nonce."""

    __slots__ = ("aead", "key", "iv", "nbytes", "seen", "tag", "enc", "buf")

    def __init__(self, key: bytes, nbytes: int, aead: Any = None, iv: bytes = _IV) -> None:
        self.aead, self.key, self.iv, self.nbytes, self.seen = aead, key, iv, nbytes, 0
        self.tag: bytes | None = None
        self.enc: Any = None
        self.buf: bytearray | None = None

    def update(self, data: Any) -> None:
        data = memoryview(data)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        n = data.nbytes
        seen = self.seen
        self.seen = seen + n
        if self.tag is not None or seen + n > self.nbytes:  # more than declared: never matches
            if n:
                self.tag = b""
            return
        if seen == 0 and n == self.nbytes:
            self.tag = (self.aead or _AESGCM(self.key)).encrypt(self.iv, b"", data)
        elif self.nbytes <= _GATHER:  # (never more than nbytes: see above)
            if self.buf is None:
                self.buf = bytearray(data)
            else:
                self.buf += data
        else:
            if self.enc is None:
                self.enc = _GCM(self.key, self.iv)
            self.enc.authenticate_additional_data(data)

    def finalize(self) -> bytes:
        if self.tag is not None:
            return self.tag
        if self.enc is not None:
            self.enc.finalize()
            return bytes(self.enc.tag)
        data = self.buf if self.buf is not None else b""
        return bytes((self.aead or _AESGCM(self.key)).encrypt(self.iv, b"", data))


def _nonce(seq: int) -> bytes:
    """Counter GMAC's nonce for the frame numbered ``seq`` (the same bytes in C)."""
    return seq.to_bytes(12, "little")


class FrameMac:
    """One direction of one link: its key and frame counter. The payload MAC both ends
    agreed on in the handshake: ``seq_gmac`` (counter GMAC) first, else ``gmac``, ``poly``."""

    __slots__ = ("_base", "seq", "poly", "gmac", "_gkey", "_aead", "_min")

    def __init__(self, key: bytes, poly: bool, gmac: bool = False,
                 seq_gmac: bool = False) -> None:
        self._base = hashlib.blake2b(key=key, digest_size=_D)
        self.seq = 0
        self.gmac = gmac and have_gmac()
        self.poly = poly and have_poly1305()
        self._gkey = b""
        self._aead: Any = None  # counter GMAC's AESGCM, made once per link direction
        self._min = _POLY_MIN  # payloads from this size use GMAC (or Poly1305), BLAKE2b below
        if seq_gmac and have_gmac():
            # its own key: BLAKE2b's parameter block (digest size, personal string) keeps
            # it apart from the header digests under the same link key
            self._gkey = hashlib.blake2b(key=key, digest_size=32, person=b"tf gmac key").digest()
            self._aead = _AESGCM(self._gkey)
            self._min = _SEQ_MIN

    @property
    def seq_gmac(self) -> bool:
        """Whether payloads carry counter GMAC (see the module's notes)."""
        return self._aead is not None

    def head(self, head: bytes | bytearray | memoryview) -> bytes:
        """The 48-byte digest of the current frame's header and ext (advances the counter)."""
        h = self._base.copy()
        h.update(self.seq.to_bytes(8, "little"))
        h.update(head)
        self.seq += 1
        return h.digest()

    def payload(self, d: bytes, nbytes: int) -> Any:
        """A MAC for the payload of the frame whose header :meth:`head` gave ``d`` (the last
        one): ``update(...)`` over its bytes in order, then ``finalize()``."""
        if nbytes >= self._min:
            if self._aead is not None:  # (_nonce(self.seq - 1), inline)
                return _Gmac(self._gkey, nbytes, self._aead,
                             (self.seq - 1).to_bytes(12, "little"))
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
        if len(payload) > _JOIN_MIN and sum(map(len, payload)) <= _JOIN_AVG * len(payload):
            # many small pieces (scattered pages): one copy and one MAC call cost less than
            # a MAC call per piece, and the frame goes out as one buffer (same tag: a MAC
            # does not see where the pieces were cut)
            joined = b"".join(payload)
            return [bufs[0], d[:TAG], joined, self.tag_of(d, joined)]
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
        if view.nbytes >= self._min:
            if self._aead is not None:
                return self._aead.encrypt(_nonce(self.seq - 1), b"", view)
            if self.gmac:
                return _AESGCM(key).encrypt(_IV, b"", view)
            if self.poly:
                return _Poly1305.generate_tag(key, view)
        return hashlib.blake2b(view, key=key, digest_size=TAG).digest()

    def native_parts(self) -> tuple[Any, ...]:
        """What ``_native.take_writes`` needs to check this direction's frames in C (layout
        ``NATIVE_PARTS``): this object (its ``seq``), the keyed BLAKE2b base, and the payload
        MACs :meth:`payload` picks from (one-time-key AESGCM or None, Poly1305 or None, the
        size from which a payload uses those or counter GMAC, counter GMAC's AESGCM or None;
        BLAKE2b below that size). The C loop applies the same rule;
        tests/unit/test_native_rx.py and test_native_mac.py check each kind."""
        return (self, self._base, hashlib.blake2b, _AESGCM if self.gmac else None,
                _Poly1305 if self.poly else None, self._min, self._aead)

    #: constant-time comparison of two tags (a C function: no Python frame per check)
    same = staticmethod(hmac.compare_digest)


