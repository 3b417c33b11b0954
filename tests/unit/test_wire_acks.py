"""Batched acknowledgements (ACKS frames): an engine that owns a region answers a burst of a
dialler's frames with one ACKS frame (one header, one MAC) instead of one ACK each, only where
the dialler said in its hello that it reads them; a malformed batch closes the link."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest

import tensorfabric as tf
from _rawpeer import RawPeer, recv_exact
from tensorfabric import _wire as w
from tensorfabric.transports import _rx
from tensorfabric.transports._handshake import F_ACKS

SECRET = "acks-test"


def _header(frame: bytes) -> tuple[int, ...]:
    return w.HEADER.unpack_from(frame)


def test_deferred_replies_go_out_as_ack_runs_in_order() -> None:
    r = _rx.Receiver.__new__(_rx.Receiver)  # the packing needs no link
    pong = w.pack_header(w.Op.PONG, 0, 0, 77)
    r._deferred = [(5, 0), (6, 2), (7, 0), pong, (9, 1)]
    frames = r._pack_deferred()
    assert r._deferred == []
    assert len(frames) == 3
    magic, op, flags, ext_len, *_ = _header(frames[0])
    assert (magic, op, flags, ext_len) == (w.MAGIC, w.Op.ACKS, 0, 3 * w.ACK_ENTRY.size)
    entries = list(w.ACK_ENTRY.iter_unpack(frames[0][w.HEADER_SIZE:]))
    assert entries == [(5, 0), (6, 2), (7, 0)]
    assert frames[1] == pong
    # a run of one is a plain ACK: op id 9, chunk 1 of 2 (the numbering the dialler checks)
    assert _header(frames[2])[1:] == (w.Op.ACK, 0, 0, 9, 0, 0, 0, 1, 2)
    # one reply on its own (a round trip's): an ACK, or the frame itself
    r._deferred = [(3, 0)]
    assert r._pack_deferred() == [w.pack_header(w.Op.ACK, 0, 0, 3, 0, 0, 0, 0, 1)]
    r._deferred = [pong]
    assert r._pack_deferred() == [pong] and r._deferred == []


def _write_frame(desc: tf.RegionDescriptor, op_id: int, offset: int, data: bytes) -> bytes:
    ext = w.OP_HEAD.pack(desc.key, offset + len(data)) + np.array(
        [(offset, len(data))], w.SEG_DTYPE).tobytes()
    head = w.pack_header(w.Op.WRITE, 0, len(ext), op_id, desc.region_id, len(data), 0, 0, 1)
    return head + ext + data


def _replies(sock: socket.socket, count: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Read frames until ``count`` acknowledgements came: [(op, [(op_id, chunk), ...])]."""
    out: list[tuple[int, list[tuple[int, int]]]] = []
    got = 0
    while got < count:
        head = recv_exact(sock, w.HEADER_SIZE)
        _, op, status, ext_len, op_id, _, plen, _, chunk, _ = w.HEADER.unpack(head)
        ext = recv_exact(sock, ext_len) if ext_len else b""
        assert plen == 0 and status == 0, (op, status, ext)
        if op == w.Op.ACKS:
            entries = list(w.ACK_ENTRY.iter_unpack(ext))
        else:
            assert op == w.Op.ACK
            entries = [(op_id, chunk)]
        out.append((op, entries))
        got += len(entries)
    return out


@pytest.mark.parametrize("reads_acks", [True, False], ids=["agreed", "old-dialler"])
def test_a_burst_is_acknowledged_in_one_frame_only_where_the_dialler_agreed(reads_acks) -> None:
    with tf.Engine(SECRET, transports=("tcp",), integrity=False) as owner:
        region = owner.register(np.zeros(4096, np.uint8), access=tf.Access.READ_WRITE)
        desc = region.descriptor()
        raw = RawPeer(owner, SECRET, integrity=False, flags=F_ACKS if reads_acks else 0)
        try:
            assert raw.ok
            assert bool(raw.mode & F_ACKS) == reads_acks
            # three writes in one send: the owner reads them in one go and answers them together
            raw.sock.sendall(b"".join(_write_frame(desc, 100 + i, 8 * i, bytes([i + 1]) * 8)
                                      for i in range(3)))
            replies = _replies(raw.sock, 3)
        finally:
            raw.sock.close()
        expected = [(100, 0), (101, 0), (102, 0)]
        if reads_acks:
            assert replies == [(w.Op.ACKS, expected)]
        else:  # a dialler of an earlier version gets one ACK per frame, as before
            assert replies == [(w.Op.ACK, [e]) for e in expected]
        assert bytes(region.view[:24]) == b"\x01" * 8 + b"\x02" * 8 + b"\x03" * 8


def _pipelined_writes(a: tf.Engine, desc: tf.RegionDescriptor, n: int, timeout: float) -> None:
    src = np.arange(256, dtype=np.uint8)
    pending = [a.write(src, desc, dst_offset=(i % 16) * 256, timeout=timeout) for i in range(n)]
    for t in pending:
        t.wait(timeout)


def test_batched_entries_for_unknown_ops_are_ignored(monkeypatch) -> None:
    """A batch may name chunks the dialler no longer waits for (a resend after a link loss
    acknowledged twice): those are skipped, the others complete."""
    real = _rx._acks_frame
    monkeypatch.setattr(_rx, "_acks_frame",
                        lambda run: real([(1 << 60, 0), *run, (12345, 7), (1 << 60, 0)]))
    with tf.Engine(SECRET, transports=("tcp",)) as owner, tf.Engine(SECRET, transports=("tcp",)) as a:
        region = owner.register(np.zeros(16 * 256, np.uint8), access=tf.Access.READ_WRITE)
        _pipelined_writes(a, region.descriptor(), 200, timeout=60)
        assert bytes(region.view[:256]) == bytes(range(256))


@pytest.mark.parametrize("bad", ["ragged", "payload", "status", "empty"])
def test_a_malformed_ack_batch_closes_the_link(monkeypatch, caplog, bad) -> None:
    """A peer that knows the secret and sends a malformed ACKS frame loses the link; the
    write it answered never completes on it, and fails within its timeout."""
    def malformed(run: list[tuple[int, int]]) -> bytes:
        ext = b"".join(w.ACK_ENTRY.pack(op_id, chunk) for op_id, chunk in run)
        if bad == "ragged":
            return w.pack_header(w.Op.ACKS, 0, len(ext) + 3) + ext + b"\0\0\0"
        if bad == "payload":  # claims a payload it does not carry
            return w.pack_header(w.Op.ACKS, 0, len(ext), 0, 0, 4) + ext
        if bad == "status":  # a batch is of OK acknowledgements only
            return w.pack_header(w.Op.ACKS, w.Status.NO_REGION, len(ext)) + ext
        return w.pack_header(w.Op.ACKS)

    monkeypatch.setattr(_rx, "_acks_frame", malformed)
    caplog.set_level(logging.WARNING, logger="tensorfabric.tcp")
    fast = dict(connect_timeout=2.0, link_timeout=1.0, reconnect_grace=0.5)
    with tf.Engine(SECRET, transports=("tcp",), **fast) as owner, \
            tf.Engine(SECRET, transports=("tcp",), **fast) as a:
        region = owner.register(np.zeros(4096, np.uint8), access=tf.Access.READ_WRITE)
        t = a.write(np.ones(64, np.uint8), region.descriptor(), timeout=5)
        with pytest.raises(tf.TensorFabricError):
            t.wait(30)
    assert "malformed acknowledgement batch" in caplog.text
