"""Authentication and hostile input: wrong secrets, garbage and truncated frames."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorfabric as tf
from tensorfabric import _auth, _wire as w
from tensorfabric._address import EngineAddress
from tensorfabric.transports._tcp import _HELLO, _REPLY

SECRET = "security-secret"


def test_missing_secret_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSORFABRIC_SECRET", raising=False)
    with pytest.raises(tf.AuthenticationError, match="TENSORFABRIC_SECRET"):
        tf.Engine()


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORFABRIC_SECRET", SECRET)
    with tf.Engine() as a, tf.Engine(SECRET) as b:
        r = b.register(bytearray(2))
        a.write(b"ok", r.descriptor()).wait(10)


def test_wrong_secret_is_refused_both_ways() -> None:
    with tf.Engine("one") as a, tf.Engine("two") as b:
        r = b.register(bytearray(8))
        with pytest.raises(tf.AuthenticationError, match="secret"):
            a.write(b"x" * 8, r.descriptor()).wait(10)
        with pytest.raises(tf.AuthenticationError):
            a.connect(b.address)
        assert bytes(r.view) == b"\0" * 8


class RawPeer:
    """A hand-made client that knows the secret and speaks the handshake, then anything."""

    def __init__(self, target: tf.Engine, secret: str = SECRET) -> None:
        addr = EngineAddress.from_bytes(target.address)
        me = EngineAddress(b"R" * 16, "raw", (("127.0.0.1", 1),))
        self.sock = socket.create_connection(addr.endpoints[0], timeout=5)
        nonce = _auth.new_nonce()
        mine = me.to_bytes()
        self.sock.sendall(_HELLO.pack(b"tfH1", me.engine_id, addr.engine_id, nonce, 0,
                                      len(mine)) + mine)
        data = b""
        while len(data) < _REPLY.size:
            data += self.sock.recv(_REPLY.size - len(data))
        _, their_id, their_nonce, _ = _REPLY.unpack(data)
        ids = me.engine_id + their_id
        self.sock.sendall(_auth.prove(secret.encode(), b"D", their_nonce, nonce, ids))
        assert self.sock.recv(4) == b"OK\0\0"

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        return _closed(self.sock, timeout)


def _closed(sock: socket.socket, timeout: float = 5.0) -> bool:
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


@pytest.fixture(scope="module")
def victim():
    with tf.Engine(SECRET, transports=("tcp",)) as eng, tf.Engine(SECRET, transports=("tcp",)) as friend:
        region = eng.register(np.zeros(4096, np.uint8))
        yield eng, friend, region


def _still_works(victim) -> None:
    eng, friend, region = victim
    friend.write(b"alive", region.descriptor(), imm=1).wait(10)
    eng.expect(1).wait(10)
    assert bytes(region.array[:5]) == b"alive"


def test_garbage_before_handshake_is_dropped(victim) -> None:
    eng, _, _ = victim
    addr = EngineAddress.from_bytes(eng.address)
    s = socket.create_connection(addr.endpoints[0], timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 200)
    assert _closed(s), "a peer that fails the handshake must be disconnected"
    s.close()
    _still_works(victim)


def test_oversized_frame_closes_the_connection(victim) -> None:
    raw = RawPeer(victim[0])
    raw.sock.sendall(w.pack_header(w.Op.SEND, 0, 0, 1, 0, 1 << 40, 0, 0, 1))
    assert raw.closed_by_peer()
    _still_works(victim)


def test_lying_segment_table_closes_the_connection(victim) -> None:
    eng, _, region = victim
    desc = region.descriptor()
    raw = RawPeer(eng)
    ext = desc.key + w.segments_table(np.array([0], np.uint64), np.array([100], np.uint64))
    raw.sock.sendall(w.pack_header(w.Op.WRITE, 0, len(ext), 1, desc.region_id, 50, 0, 0, 1) +
                     ext + b"x" * 50)
    assert raw.closed_by_peer()
    assert not region.array[5:].any()
    _still_works(victim)


def test_truncated_frame_then_hangup(victim) -> None:
    eng, _, region = victim
    desc = region.descriptor()
    raw = RawPeer(eng)
    ext = desc.key + w.segments_table(np.array([1000], np.uint64), np.array([1000], np.uint64))
    raw.sock.sendall(w.pack_header(w.Op.WRITE, w.FLAG_IMM, len(ext), 1, desc.region_id, 1000,
                                   77, 0, 1) + ext + b"y" * 10)
    raw.sock.close()
    time.sleep(0.2)
    with pytest.raises(tf.TransferTimeout):  # a frame cut short never counts its immediate
        eng.expect(77, timeout=0.3).wait()
    _still_works(victim)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(
        lambda op, flags, ext_len, region, plen, chunk, nchunks, tail: struct.pack(
            "<HBBIQQQQII", w.MAGIC, op, flags, ext_len, 1, region, plen, 0, chunk, nchunks) + tail,
        st.integers(0, 255), st.integers(0, 255), st.integers(0, 1 << 31),
        st.integers(0, 1 << 63), st.integers(0, 1 << 63), st.integers(0, 4), st.integers(0, 4),
        st.binary(max_size=64)),
))
def test_garbage_frames_never_hurt_the_engine(victim, frame: bytes) -> None:
    raw = RawPeer(victim[0])
    try:
        raw.sock.sendall(frame)
        raw.sock.shutdown(socket.SHUT_WR)  # a truncated frame: then the peer hangs up
    except OSError:
        pass  # the engine already dropped us: also fine
    assert raw.closed_by_peer()
    raw.sock.close()
    _still_works(victim)
