"""Frame MACs computed from C (``_native.seal``, and the checks of ``_native.take_writes``):
the same bytes as ``FrameMac.seal`` for every payload MAC of its rule, the counter moving the
same way, and a frame the C side tagged accepted by the Python side's check (and back)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorfabric import _compiled
from tensorfabric import _wire as w
from tensorfabric.transports._integrity import FrameMac, have_gmac, have_poly1305

native = _compiled.native
pytestmark = pytest.mark.skipif(native is None or not hasattr(native, "seal"),
                                reason="tensorfabric._native is not built")

KEY = bytes(range(100, 132))
KINDS = {  # name: (counter gmac, gmac, poly1305); each payload size below picks its MAC by
    # FrameMac's rule
    "counter gmac": (True, True, True),
    "gmac": (False, True, True),
    "poly1305": (False, False, True),
    "blake2b only": (False, False, False),
}
HEAD = w.pack_header(w.Op.WRITE, 0, 40, 7, 1, 0, 0, 0, 1) + bytes(40)


def _pair(kind: str) -> tuple[FrameMac, FrameMac]:
    seq, gmac, poly = KINDS[kind]
    return FrameMac(KEY, poly, gmac, seq), FrameMac(KEY, poly, gmac, seq)


def _bytes(parts: list) -> bytes:
    return b"".join(memoryview(p).cast("B").tobytes() for p in parts)


@pytest.mark.parametrize("size", [0, 1, 100, 4095, 4096, 65536])
@pytest.mark.parametrize("kind", list(KINDS))
def test_seal_is_framemacs_seal(kind: str, size: int) -> None:
    py, c = _pair(kind)
    seq, gmac, poly = KINDS[kind]
    assert (c.seq_gmac, c.gmac, c.poly) == (seq and have_gmac(), gmac and have_gmac(),
                                            poly and have_poly1305())
    for i in range(3):  # the counter moves on: each frame's tags differ
        payload = bytes((i + j) % 251 for j in range(size))
        frame = [HEAD, payload] if size else [HEAD]
        want = py.seal(list(frame))
        got = native.seal(c.native_parts(), list(frame))
        assert _bytes(got) == _bytes(want) and len(got) == len(want)
        assert got[0] is HEAD and (not size or got[2] is payload)  # no copies of the data
        assert c.seq == py.seq == i + 1


@pytest.mark.parametrize("kind", ["counter gmac", "gmac"])
def test_seal_takes_any_contiguous_payload_and_hands_longer_frames_to_python(kind: str) -> None:
    py, c = _pair(kind)
    arr = np.arange(2048, dtype=np.float32).reshape(32, 64)  # 8 KiB, not a byte format
    assert _bytes(native.seal(c.native_parts(), [HEAD, arr])) == _bytes(py.seal([HEAD, arr]))
    three = [HEAD, b"a" * 5000, b"b" * 3000]  # the streaming payload MAC: FrameMac.seal's
    assert _bytes(native.seal(c.native_parts(), list(three))) == _bytes(py.seal(list(three)))
    assert c.seq == py.seq == 2
    with pytest.raises((BufferError, ValueError, TypeError)):
        native.seal(c.native_parts(), [HEAD, arr[:, ::2]])  # not contiguous
    with pytest.raises(TypeError):
        native.seal(("not", "parts"), [HEAD])
    with pytest.raises(TypeError):
        native.seal(c.native_parts(), (HEAD,))
    assert c.seq == 2  # a frame that could not be sealed spends no counter value


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_python_check_accepts_what_c_sealed(kind: str) -> None:
    tx, rx = _pair(kind)
    payload = b"z" * 4096
    head, tag1, body, tag2 = native.seal(tx.native_parts(), [HEAD, payload])
    d = rx.head(HEAD)
    assert FrameMac.same(d[:16], tag1)
    m = rx.payload(d, len(payload))
    m.update(body)
    assert FrameMac.same(m.finalize(), tag2)
    flipped = bytearray(payload)
    flipped[17] ^= 4
    d2 = rx.head(HEAD)  # the next frame: the same payload's tag is another one
    assert d2 != d
    assert rx.tag_of(d, bytes(flipped)) != tag2


def test_head_is_framemacs_head() -> None:
    py, c = _pair("gmac")
    for i in range(3):
        data = HEAD + bytes([i]) * 20
        assert native.head(c.native_parts(), data) == py.head(data)
        assert native.head(c.native_parts(), bytearray(data[:48])) == py.head(data[:48])
        assert c.seq == py.seq == 2 * (i + 1)
    with pytest.raises(TypeError):
        native.head(c.native_parts(), "not bytes")
    assert c.seq == 6


@pytest.mark.skipif(not have_gmac(), reason="needs cryptography's AES-GCM")
def test_counter_gmac_is_gcm_under_the_derived_key_with_the_frame_counter_as_nonce() -> None:
    """The construction, computed here from its definition: from 256 B, the payload tag of
    frame ``seq`` is AES-256-GCM's tag with nothing encrypted, the payload as associated data,
    the key BLAKE2b(link key, 32 bytes, person "tf gmac key"), the nonce ``seq`` as 12 bytes
    little-endian; below, keyed BLAKE2b-128 under the frame's one-time key (the last 32 bytes
    of BLAKE2b-384(link key, seq || header)). From C, from Python in one call and streamed in
    pieces (as the receiver does)."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    gkey = hashlib.blake2b(key=KEY, digest_size=32, person=b"tf gmac key").digest()

    def want(seq: int, payload: bytes) -> bytes:
        if len(payload) >= 256:
            return AESGCM(gkey).encrypt(seq.to_bytes(12, "little"), b"", payload)
        d = hashlib.blake2b(seq.to_bytes(8, "little") + HEAD, key=KEY, digest_size=48).digest()
        return hashlib.blake2b(payload, key=d[16:], digest_size=16).digest()

    py, c = _pair("counter gmac")
    rx = FrameMac(KEY, True, True, True)
    for seq, size in enumerate([1, 100, 255, 256, 4096, 70000]):
        payload = bytes((seq * 7 + j) % 256 for j in range(size))
        frame = [HEAD, payload]
        assert _bytes(py.seal(list(frame))[3:]) == want(seq, payload)
        assert _bytes(native.seal(c.native_parts(), list(frame))[3:]) == want(seq, payload)
        m = rx.payload(rx.head(HEAD), size)  # the receiver's streamed check, in 3 pieces
        for a, b in ((0, size // 3), (size // 3, size // 2), (size // 2, size)):
            m.update(payload[a:b])
        assert m.finalize() == want(seq, payload)
        m = rx.payload(rx.head(HEAD), size)  # a byte more than declared, in pieces: no match
        m.update(payload[:size // 2])
        m.update(payload[size // 2:] + b"!")
        assert m.finalize() != want(seq + 1, payload)
        rx.seq = seq + 1
    mine, other = FrameMac(KEY, True, True, True), FrameMac(bytes(32), True, True, True)
    mine.seq = other.seq = 1  # (as after one head())
    assert other.tag_of(b"", b"x" * 300) != mine.tag_of(b"", b"x" * 300)  # another link's key
