"""Authentication and hostile input: wrong secrets, garbage and truncated frames."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorfabric as tf
from _rawpeer import RawPeer as _RawPeer, closed as _closed
from tensorfabric import _wire as w
from tensorfabric._address import EngineAddress

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


def RawPeer(target: tf.Engine, secret: str = SECRET) -> _RawPeer:
    raw = _RawPeer(target, secret)
    assert raw.ok
    return raw


BASELINE: dict[str, int] = {}
#: how much this process's resident memory may grow over the frame fuzz (the fuzzer's own
#: bookkeeping included); an engine that kept each hostile frame's claimed payload would not fit
FUZZ_RSS_GROWTH = 48 << 20
_FUZZ_BATCH = 10  # examples between resident-memory checks


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def victim():
    with tf.Engine(SECRET, transports=("tcp",)) as eng, tf.Engine(SECRET, transports=("tcp",)) as friend:
        region = eng.register(np.zeros(4096, np.uint8))
        friend.write(b"warm", region.descriptor()).wait(10)  # the friend's link is up
        BASELINE["threads"] = threading.active_count()
        BASELINE["fds"] = len(os.listdir("/proc/self/fd"))
        BASELINE["rss"] = _rss()
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
    raw.send(w.pack_header(w.Op.SEND, 0, 0, 1, 0, 1 << 40, 0, 0, 1))
    assert raw.closed_by_peer()
    _still_works(victim)


def test_lying_segment_table_closes_the_connection(victim) -> None:
    eng, _, region = victim
    desc = region.descriptor()
    raw = RawPeer(eng)
    ext = w.OP_HEAD.pack(desc.key, 100) + w.segments_table(np.array([0], np.uint64),
                                                           np.array([100], np.uint64))
    raw.send(w.pack_header(w.Op.WRITE, 0, len(ext), 1, desc.region_id, 50, 0, 0, 1) + ext,
             b"x" * 50)
    assert raw.closed_by_peer()
    assert not region.array[5:].any()
    _still_works(victim)


def test_truncated_frame_then_hangup(victim) -> None:
    eng, _, region = victim
    desc = region.descriptor()
    raw = RawPeer(eng)
    ext = w.OP_HEAD.pack(desc.key, 2000) + w.segments_table(np.array([1000], np.uint64),
                                                            np.array([1000], np.uint64))
    frame = raw.seal(w.pack_header(w.Op.WRITE, w.FLAG_IMM, len(ext), 1, desc.region_id, 1000,
                                   77, 0, 1) + ext, b"y" * 1000)
    raw.sock.sendall(frame[:-1000])  # cut short in the payload
    raw.sock.close()
    time.sleep(0.2)
    with pytest.raises(tf.TransferTimeout):  # a frame cut short never counts its immediate
        eng.expect(77, timeout=0.3).wait()
    _still_works(victim)


_fields = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 1 << 63),
                    st.integers(0, 4), st.integers(0, 4), st.integers(0, 1 << 63))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(min_size=1, max_size=300).map(lambda b: ("raw", b, b"")),
    st.builds(  # well-formed, correctly MACed frames with hostile contents (post-auth parsing)
        lambda f, ext, payload, lie: ("sealed", struct.pack(
            "<HBBIQQQQII", w.MAGIC, f[0], f[1], len(ext), 1, f[2] % (1 << 16),
            len(payload) + lie, f[5], f[3], f[4]) + ext, payload),
        _fields, st.binary(max_size=80), st.binary(max_size=200), st.sampled_from([0, 0, 7])),
))
def test_garbage_frames_never_hurt_the_engine(victim, case) -> None:
    kind, head, payload = case
    raw = RawPeer(victim[0])
    try:
        if kind == "raw":
            raw.sock.sendall(head)
        else:
            raw.send(head, payload)
        raw.sock.shutdown(socket.SHUT_WR)  # a truncated frame: then the peer hangs up
    except OSError:
        pass  # the engine already dropped us: also fine
    assert raw.closed_by_peer()
    raw.sock.close()
    _still_works(victim)
    BASELINE["fuzzed"] = BASELINE.get("fuzzed", 0) + 1
    if BASELINE["fuzzed"] % _FUZZ_BATCH == 0:  # after each batch: memory stays bounded
        assert _rss() - BASELINE["rss"] < FUZZ_RSS_GROWTH


def test_fuzzing_left_nothing_behind(victim) -> None:
    """After the frame fuzz: every fuzzing connection is gone, with its threads and fds."""
    eng, friend, _ = victim
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        others = [c for c in list(eng._tcp._accepted) if c.peer.engine_id != friend._id]
        if not others and threading.active_count() <= BASELINE["threads"] and \
                len(os.listdir("/proc/self/fd")) <= BASELINE["fds"]:
            break
        time.sleep(0.2)
    assert not [c for c in list(eng._tcp._accepted) if c.peer.engine_id != friend._id]
    assert threading.active_count() <= BASELINE["threads"]
    assert len(os.listdir("/proc/self/fd")) <= BASELINE["fds"]
    assert eng._inbox_bytes == sum(len(m.data) + 256 for q in eng._inbox.values() for m in q)
    assert _rss() - BASELINE["rss"] < FUZZ_RSS_GROWTH
    _still_works(victim)
