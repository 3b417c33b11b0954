"""The owner's compiled loop over small writes (``_native.take_writes``): it copies the plain
one-segment WRITE frames that the Python path would take without a word, queues their
acknowledgements, and leaves every other frame (partial, malformed, refused) untouched for the
Python path, which answers or closes the link as the protocol says. Then the same over a real
link, against a raw peer: a burst of good writes with bad ones among them."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

import tensorfabric as tf
from _rawpeer import RawPeer, recv_exact
from tensorfabric import _compiled
from tensorfabric import _wire as w
from tensorfabric.transports._handshake import F_ACKS, F_GMAC, F_GMAC_SEQ
from tensorfabric.transports._integrity import FrameMac, have_gmac, have_poly1305

native = _compiled.native
pytestmark = pytest.mark.skipif(native is None or not hasattr(native, "take_writes"),
                                reason="tensorfabric._native is not built")

SECRET = "native-rx"
KEY = bytes(range(16))


class Region:
    """What take_writes reads of a region (the engine's MemoryRegion has the same three)."""

    def __init__(self, nbytes: int, access: int = 3, key: bytes = KEY) -> None:
        self.array = np.zeros(nbytes, np.uint8)
        self._view: memoryview | None = memoryview(self.array)
        self._key = key
        self._access_bits = access


def frame(op_id: int, region: int, off: int, data: bytes, *, key: bytes = KEY, end: int | None = None,
          op: int = w.Op.WRITE, flags: int = 0, plen: int | None = None, n: int | None = None,
          chunk: int = 0, nchunks: int = 1, imm: int = 0) -> bytes:
    n = len(data) if n is None else n
    ext = w.OP_HEAD.pack(key, off + n if end is None else end) + np.array(
        [(off, n)], w.SEG_DTYPE).tobytes()
    head = w.pack_header(op, flags, len(ext), op_id, region, len(data) if plen is None else plen,
                         imm, chunk, nchunks)
    return head + ext + data


def take(buf: bytes, regions: dict, room: int = 64) -> tuple[int, list]:
    b = bytearray(buf)
    acks: list = []
    end = native.take_writes(memoryview(b), 0, len(b), regions, acks, room)
    return end, acks


def test_takes_a_burst_and_queues_its_acknowledgements() -> None:
    r = Region(4096)
    burst = b"".join(frame(10 + i, 1, 100 * i, bytes([i + 1]) * 50, chunk=i % 2, nchunks=2)
                     for i in range(5))
    end, acks = take(burst, {1: r})
    assert end == len(burst)
    assert acks == [(10 + i, i % 2) for i in range(5)]
    for i in range(5):
        assert bytes(r.array[100 * i:100 * i + 50]) == bytes([i + 1]) * 50
    # room bounds it (the caller flushes at its bound of acknowledgements)
    end, acks = take(burst, {1: Region(4096)}, room=2)
    assert acks == [(10, 0), (11, 1)] and end == 2 * len(burst) // 5


def _bad_frames() -> dict[str, tuple[bytes, dict]]:
    good = {1: Region(256)}
    data = b"x" * 64
    return {
        "wrong key": (frame(1, 1, 0, data, key=b"k" * 16), good),
        "no such region": (frame(1, 2, 0, data), good),
        "unregistered": (frame(1, 1, 0, data), {1: _closed()}),
        "read-only region": (frame(1, 1, 0, data), {1: Region(256, access=2)}),
        "past the end": (frame(1, 1, 200, data), good),
        "op end past the region": (frame(1, 1, 0, data, end=257), good),
        "segment past the end, op end inside": (frame(1, 1, 200, data, end=100), good),
        "offset wraps": (frame(1, 1, 2 ** 64 - 8, data, end=56), good),
        "with an immediate": (frame(1, 1, 0, data, flags=w.FLAG_IMM), good),
        "another op": (frame(1, 1, 0, data, op=w.Op.SEND), good),
        "segment != payload": (frame(1, 1, 0, data, n=63), good),
        "chunk numbering": (frame(1, 1, 0, data, chunk=1, nchunks=1), good),
        "no chunks": (frame(1, 1, 0, data, nchunks=0), good),
        "empty payload": (frame(1, 1, 0, b""), good),
        "payload not all here": (frame(1, 1, 0, data)[:-1], good),
        "bad magic": (b"\0\0" + frame(1, 1, 0, data)[2:], good),
        "key of another length": (frame(1, 1, 0, data), {1: Region(256, key=KEY + b"!")}),
    }


def _closed() -> Region:
    r = Region(256)
    r._view = None
    return r


@pytest.mark.parametrize("case", list(_bad_frames()))
def test_leaves_every_other_frame_to_the_python_path(case: str) -> None:
    bad, regions = _bad_frames()[case]
    good = frame(7, 1, 0, b"ok")
    end, acks = take(good + bad, regions)
    # the good frame before it is taken (where its region takes it), the bad one is not
    first = len(good) if regions[1]._view is not None and case not in (
        "read-only region", "key of another length") else 0
    assert end == first
    assert acks == ([(7, 0)] if first else [])
    for r in regions.values():
        if r._view is not None:
            assert not r.array[2:].any()  # nothing of the bad frame landed


LINK_KEY = bytes(range(32, 64))
MAC_KINDS = {  # name: (counter gmac, gmac, poly1305, payload size): each payload MAC of
    # FrameMac.payload's rule
    "counter gmac (small payload)": (True, True, True, 100),
    "counter gmac": (True, True, True, 4096),
    "blake2b (small payload)": (False, True, True, 100),
    "gmac": (False, True, True, 4096),
    "poly1305": (False, False, True, 8192),
    "blake2b (neither)": (False, False, False, 4096),
}


def macs(seq: bool, gmac: bool = True, poly: bool = True) -> tuple[FrameMac, FrameMac]:
    """The two ends of one direction of a link: the sender's MAC and the receiver's."""
    return FrameMac(LINK_KEY, poly, gmac, seq), FrameMac(LINK_KEY, poly, gmac, seq)


def sealed(tx: FrameMac, raw: bytes) -> bytes:
    """A frame from frame() with its tags (tx's next counter value)."""
    head_ext, payload = _split(raw)
    return b"".join(bytes(p) for p in tx.seal([head_ext, payload] if payload else [head_ext]))


@pytest.mark.parametrize("kind", list(MAC_KINDS))
def test_takes_frames_whose_macs_check_out(kind: str) -> None:
    seq, gmac, poly, size = MAC_KINDS[kind]
    tx, rx = macs(seq, gmac, poly)
    assert (tx.seq_gmac, tx.gmac, tx.poly) == (seq and have_gmac(), gmac and have_gmac(),
                                               poly and have_poly1305())
    r = Region(4 * size)
    burst = b"".join(sealed(tx, frame(20 + i, 1, size * i, bytes([i + 1]) * size))
                     for i in range(4))
    b, acks = bytearray(burst), []
    end = native.take_writes(memoryview(b), 0, len(b), {1: r}, acks, 64, rx.native_parts())
    assert end == len(burst) and acks == [(20 + i, 0) for i in range(4)]
    assert rx.seq == tx.seq == 4  # the counter moved past the frames taken, no further
    for i in range(4):
        assert bytes(r.array[size * i:size * (i + 1)]) == bytes([i + 1]) * size


def _spoiled(case: str, tx: FrameMac, first: bytes, size: int) -> bytes:
    """A frame of ``size`` bytes whose tags do not check out, sent after the good ``first``."""
    data = b"y" * size
    head = w.HEADER_SIZE + 40
    if case == "replayed":  # the good frame again: its counter value is spent
        return first
    if case == "skips a counter value":  # as if a frame in between were dropped
        tx.seq += 1
        return sealed(tx, frame(2, 1, 0, data))
    bad = bytearray(sealed(tx, frame(2, 1, 0, data)))
    at = {"header byte": 8, "ext byte": w.HEADER_SIZE + 20, "tag1 byte": head + 3,
          "payload byte": head + 16 + size // 2, "tag2 byte": len(bad) - 1}[case]
    bad[at] ^= 1
    return bytes(bad)


@pytest.mark.parametrize("case", ["replayed", "skips a counter value", "header byte", "ext byte",
                                  "tag1 byte", "payload byte", "tag2 byte"])
@pytest.mark.parametrize("kind", ["counter gmac", "counter gmac (small payload)", "gmac",
                                  "blake2b (small payload)"])
def test_leaves_a_frame_with_a_bad_mac_to_the_python_path(case: str, kind: str) -> None:
    """The frame after a good one fails its MAC: the good one is taken, the bad one is not
    (nothing of it lands, the counter stays at its value for the Python path, which closes
    the link)."""
    seq, gmac, poly, size = MAC_KINDS[kind]
    tx, rx = macs(seq, gmac, poly)
    first = sealed(tx, frame(1, 1, 0, b"ok"))
    bad = _spoiled(case, tx, first, size)
    r = Region(8192)
    b, acks = bytearray(first + bad), []
    end = native.take_writes(memoryview(b), 0, len(b), {1: r}, acks, 64, rx.native_parts())
    assert end == len(first) and acks == [(1, 0)] and rx.seq == 1
    assert bytes(r.array[:2]) == b"ok" and not r.array[2:].any()


def test_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        native.take_writes(memoryview(bytearray(8)), 0, 9, {}, [], 1)
    with pytest.raises(ValueError):
        native.take_writes(memoryview(bytearray(8)), 5, 4, {}, [], 1)
    with pytest.raises(TypeError):
        native.take_writes(memoryview(bytearray(8)), 0, 8, [], [], 1)
    with pytest.raises(TypeError):
        native.take_writes(memoryview(bytearray(8)), 0, 8, {}, [], 1, ("not", "parts"))


def _size(i: int) -> int:
    return 4096 if i % 3 == 0 else 100


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """A frame from frame() as (header + ext, payload)."""
    return raw[:w.HEADER_SIZE + 40], raw[w.HEADER_SIZE + 40:]


def _acks(peer: RawPeer, want: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Read replies until ``want`` came: (OK acknowledgements, (op id, status) of refusals);
    on a link with frame MACs each reply's tag is checked."""
    ok: list[tuple[int, int]] = []
    refused: list[tuple[int, int]] = []
    sock = peer.sock
    while len(ok) + len(refused) < want:
        head = recv_exact(sock, w.HEADER_SIZE)
        _, op, status, ext_len, op_id, _, plen, _, chunk, _ = w.HEADER.unpack(head)
        ext = recv_exact(sock, ext_len) if ext_len else b""
        assert not plen
        if peer.rx is not None:
            assert peer.rx.head(head + ext)[:16] == recv_exact(sock, 16)
        if op == w.Op.ACKS:
            ok += list(w.ACK_ENTRY.iter_unpack(ext))
        elif status:
            refused.append((op_id, status))
        else:
            ok.append((op_id, chunk))
    return ok, refused


#: the payload MACs a raw peer offers: the engine's default, and what a peer of an earlier
#: version has (one-time-key GMAC): the engine agrees on either
PEER_MACS = {"counter gmac": F_GMAC | F_GMAC_SEQ, "one-time gmac": F_GMAC}


@pytest.mark.parametrize("integrity", [False, True], ids=["plain", "macs"])
@pytest.mark.parametrize("peer_mac", list(PEER_MACS))
@pytest.mark.parametrize("compiled", [True, False])
def test_a_burst_with_bad_writes_among_good_ones(monkeypatch, compiled, integrity,
                                                 peer_mac) -> None:
    """A raw peer (ACKS agreed; plain, or with frame MACs) sends one burst: good writes, one
    with a wrong key, one past the region's end, one with an immediate; each good one lands and
    is acknowledged, each bad one is refused with its status and nothing of it lands, on both
    paths. Payloads of 100 B and 4 KiB, so that MAC'd links use both payload MACs."""
    if not compiled:
        monkeypatch.setattr(_compiled, "native", None)
    with tf.Engine(SECRET, transports=("tcp",), integrity=integrity) as owner:
        region = owner.register(np.zeros(1 << 18, np.uint8), tf.Access.READ_WRITE)
        desc = region.descriptor()
        peer = RawPeer(owner, SECRET, integrity=integrity, flags=F_ACKS | PEER_MACS[peer_mac],
                       timeout=60)  # (a busy machine)
        try:
            assert peer.ok and peer.mode & F_ACKS
            assert peer.tx is None or peer.tx.gmac == have_gmac()
            assert peer.tx is None or peer.tx.seq_gmac == (peer_mac == "counter gmac"
                                                           and have_gmac())
            deadline = time.monotonic() + 30
            while not owner._tcp._accepted and time.monotonic() < deadline:
                time.sleep(0.01)  # the owner files the accepted link a moment after the hello
            conn = next(iter(owner._tcp._accepted))
            assert (conn._take is not None) == compiled
            assert (conn._take_mac is not None) == (compiled and integrity)
            burst = []
            for i in range(40):
                key = b"k" * 16 if i == 13 else desc.key
                off = (1 << 18) - 10 if i == 27 else 5000 * i
                burst.append(peer.seal(*_split(frame(
                    100 + i, desc.region_id, off, bytes([i + 1]) * _size(i), key=key,
                    flags=w.FLAG_IMM if i == 33 else 0, imm=9))))
            peer.sock.sendall(b"".join(burst))
            ok, refused = _acks(peer, 40)
        finally:
            peer.sock.close()
        assert sorted(refused) == [(113, w.Status.BAD_KEY), (127, w.Status.OUT_OF_BOUNDS)]
        assert sorted(ok) == [(100 + i, 0) for i in range(40) if i not in (13, 27)]
        for i in range(40):
            n = _size(i)
            got = bytes(region.array[5000 * i:5000 * i + n])
            assert got == (bytes(n) if i in (13, 27) else bytes([i + 1]) * n), i
        assert not region.array[(1 << 18) - 10:].any()
        owner.expect(9, 1, timeout=10).wait()  # the immediate counted, once
        with pytest.raises(tf.TransferTimeout):
            owner.expect(9, 1, timeout=0.3).wait()


@pytest.mark.parametrize("peer_mac", list(PEER_MACS))
@pytest.mark.parametrize("size", [100, 4096])
@pytest.mark.parametrize("imm", [False, True], ids=["write", "write+imm"])
@pytest.mark.parametrize("compiled", [True, False])
def test_a_flipped_payload_byte_closes_the_link_before_a_byte_lands(monkeypatch, compiled,
                                                                    imm, size,
                                                                    peer_mac) -> None:
    """A MAC'd write whose payload was changed on the way: the owner closes the link and
    nothing of it reaches the region (its tag is checked before the copy), whichever path
    reads it (the compiled loop; Python for an immediate or without the extension)."""
    if not compiled:
        monkeypatch.setattr(_compiled, "native", None)
    with tf.Engine(SECRET, transports=("tcp",)) as owner:
        region = owner.register(np.zeros(8192, np.uint8), tf.Access.READ_WRITE)
        desc = region.descriptor()
        peer = RawPeer(owner, SECRET, flags=F_ACKS | PEER_MACS[peer_mac], timeout=60)
        try:
            assert peer.ok and peer.tx is not None
            good = peer.seal(*_split(frame(1, desc.region_id, 0, b"g" * 10, key=desc.key)))
            bad = bytearray(peer.seal(*_split(frame(
                2, desc.region_id, 100, b"b" * size, key=desc.key,
                flags=w.FLAG_IMM if imm else 0, imm=3))))
            bad[-16 - size // 2] ^= 1
            peer.sock.sendall(good + bytes(bad))
            assert peer.closed_by_peer(timeout=60)
        finally:
            peer.sock.close()
        assert bytes(region.array[:10]) == b"g" * 10  # the good frame before it landed
        assert not region.array[10:].any()
        with pytest.raises(tf.TransferTimeout):
            owner.expect(3, 1, timeout=0.3).wait()
