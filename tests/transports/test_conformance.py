"""The shared conformance suite on each built-in transport."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

from tensorfabric import Access, Engine, _compiled
from tensorfabric.testing import Pair, TransportConformance

SECRET = "conformance-secret"


class TestTcp(TransportConformance):
    """One link, regions in private memory: every op goes over the socket, with frame MACs
    (the default); the owner checks and takes buffered small writes in its compiled loop
    (``_native.take_writes``) where the extension is built."""

    @pytest.fixture
    def pair(self) -> Iterator[Pair]:
        with Engine(SECRET, transports=("tcp",), name="a") as a, \
                Engine(SECRET, transports=("tcp",), name="b") as b:
            yield Pair(a, b, lambda n, acc: b.register(np.zeros(n, np.uint8), acc))


class TestTcpPython(TransportConformance):
    """The same without the compiled loop: the pure-Python receive path with frame MACs."""

    @pytest.fixture
    def pair(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
        monkeypatch.setattr(_compiled, "native", None)
        with Engine(SECRET, transports=("tcp",), name="a") as a, \
                Engine(SECRET, transports=("tcp",), name="b") as b:
            yield Pair(a, b, lambda n, acc: b.register(np.zeros(n, np.uint8), acc))


class TestTcpPlain(TransportConformance):
    """Frames without MACs (``integrity=False``): the owner takes buffered small writes in its
    compiled loop (``_native.take_writes``) where the extension is built."""

    @pytest.fixture
    def pair(self) -> Iterator[Pair]:
        with Engine(SECRET, transports=("tcp",), integrity=False) as a, \
                Engine(SECRET, transports=("tcp",), integrity=False) as b:
            yield Pair(a, b, lambda n, acc: b.register(np.zeros(n, np.uint8), acc))


class TestTcpPlainPython(TransportConformance):
    """The same without the compiled loop: the pure-Python receive path it falls back to."""

    @pytest.fixture
    def pair(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
        monkeypatch.setattr(_compiled, "native", None)
        with Engine(SECRET, transports=("tcp",), integrity=False) as a, \
                Engine(SECRET, transports=("tcp",), integrity=False) as b:
            yield Pair(a, b, lambda n, acc: b.register(np.zeros(n, np.uint8), acc))


class TestTcpThreadPerLink(TransportConformance):
    """Without the shared poller (as on TLS links, or without epoll): every accepted link has
    a receive thread of its own that hands messages and immediates to the waiting caller."""

    @pytest.fixture
    def pair(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
        import tensorfabric.transports._tcp as tcp

        monkeypatch.setattr(tcp, "poller_available", lambda: False)
        with Engine(SECRET, transports=("tcp",), name="a") as a, \
                Engine(SECRET, transports=("tcp",), name="b") as b:
            assert a._tcp.poller is None and b._tcp.poller is None
            yield Pair(a, b, lambda n, acc: b.register(np.zeros(n, np.uint8), acc))


class TestTcpMultiLink(TransportConformance):
    """Three links per peer and small chunks, so ops are striped."""

    @pytest.fixture
    def pair(self) -> Iterator[Pair]:
        with Engine(SECRET, transports=("tcp",), links=3, chunk_bytes=1 << 20) as a, \
                Engine(SECRET, transports=("tcp",), links=3) as b:
            yield Pair(a, b, lambda n, acc: b.register(np.zeros(n, np.uint8), acc),
                       big=256 << 20)


class TestShm(TransportConformance):
    """Same host, regions from alloc(): data is copied straight into shared memory."""

    @pytest.fixture
    def pair(self) -> Iterator[Pair]:
        with Engine(SECRET, name="a") as a, Engine(SECRET, name="b") as b:
            def make(n: int, acc: Access):
                region = b.alloc(n, acc)
                # a write-only region cannot be mapped without being readable: tcp carries it
                want = "shm" if acc & Access.REMOTE_READ else "tcp"
                assert a._transport_for(a._peer(b.address), region.descriptor()).name == want
                return region

            yield Pair(a, b, make)
