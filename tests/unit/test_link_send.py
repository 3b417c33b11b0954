"""A link's gathered send (``Conn._send_bufs``) over a real socket: more pieces than one
``sendmsg`` takes, a socket that takes a part of them at a time, pieces of any buffer type."""

from __future__ import annotations

import socket
import threading
import types

import numpy as np
import pytest

from tensorfabric.transports._handshake import IOV_MAX
from tensorfabric.transports._link import Conn


def _pieces(rng: np.random.Generator, n: int, most: int) -> list[object]:
    out: list[object] = []
    for i in range(n):
        size = int(rng.integers(0, most)) if i % 7 else 0  # empty pieces among them
        data = rng.integers(0, 256, size, dtype=np.uint8)
        kind = i % 4
        if kind == 0:
            out.append(data.tobytes())
        elif kind == 1:
            out.append(memoryview(data.tobytes()))
        elif kind == 2:
            out.append(data)  # a numpy array: sent through its buffer
        else:  # not byte-sized items: its bytes, not its items, count
            out.append(np.frombuffer(data.tobytes()[: size // 4 * 4], np.float32))
    return out


@pytest.mark.parametrize("partial", [True, False], ids=["partial", "whole"])
def test_every_piece_arrives_in_order(partial: bool) -> None:
    """Several sendmsg calls' worth of pieces: with small socket buffers every call sends
    a part (``partial``); with small pieces each call sends all it was given (``whole``)."""
    rng = np.random.default_rng(5)
    bufs = _pieces(rng, 3 * IOV_MAX + 17, 3000 if partial else 24)
    want = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
    a, b = socket.socketpair()
    if partial:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    a.settimeout(30)
    b.settimeout(30)
    got = bytearray()

    def read() -> None:
        while len(got) < len(want):
            chunk = b.recv(1500)  # small reads: the sender fills up and waits
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    link = types.SimpleNamespace(sock=a, tls=False, last_tx=0.0, bytes_sent=0)
    try:
        Conn._send_bufs(link, list(bufs))  # type: ignore[arg-type]
        reader.join(30)
    finally:
        a.close()
        b.close()
    assert not reader.is_alive()
    assert link.bytes_sent == len(want)
    assert bytes(got) == want
