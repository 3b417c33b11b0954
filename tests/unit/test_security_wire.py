"""A relay without the secret between two engines (a real tcp proxy, its own process) that
flips, replays, reorders, drops or splices frames, rewrites a message or the handshake's
address, or terminates TLS: the link is closed, nothing it changed is delivered, and the
honest resend completes the op exactly once."""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric._address import EngineAddress

SECRET = "wire-security-secret"
RELAY = Path(__file__).with_name("_relay.py")


class Relay:
    def __init__(self, target: tf.Engine, mode: str, arg: str = "") -> None:
        host, port = target.endpoints[0]
        self.p = subprocess.Popen([sys.executable, str(RELAY), host, str(port), mode, arg],
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        self.port = int(self.p.stdout.readline().split()[1])
        real = EngineAddress.from_bytes(target.address)
        self.address = dataclasses.replace(real, endpoints=(("127.0.0.1", self.port),)).to_bytes()

    def via(self, desc: tf.RegionDescriptor) -> tf.RegionDescriptor:
        return dataclasses.replace(desc, owner=self.address)

    def tampered(self) -> int:
        self.p.kill()
        out, _ = self.p.communicate(timeout=10)
        return out.count("TAMPERED")


@pytest.fixture
def relay_factory():
    made: list[Relay] = []

    def make(target: tf.Engine, mode: str, arg: str = "") -> Relay:
        r = Relay(target, mode, arg)
        made.append(r)
        return r

    yield make
    for r in made:
        if r.p.poll() is None:
            r.p.kill()
            r.p.wait()


def _pair(**kw):
    a = tf.Engine(SECRET, transports=("tcp",), name="a", link_timeout=2, **kw)
    b = tf.Engine(SECRET, transports=("tcp",), name="b", **{k: v for k, v in kw.items()
                                                          if k in ("integrity",)})
    return a, b


@pytest.mark.parametrize("mode,links", [("flip", 1), ("replay", 1), ("reorder", 1),
                                        ("drop", 1), ("splice", 2)])
def test_tampered_frames_are_refused_and_resent(relay_factory, caplog, mode, links) -> None:
    caplog.set_level(logging.WARNING, logger="tensorfabric.tcp")
    a, b = _pair(links=links, chunk_bytes=256 << 10)
    with a, b:
        region = b.register(np.zeros(4 << 20, np.uint8))
        relay = relay_factory(b, mode)
        src = np.random.default_rng(7).integers(0, 256, 4 << 20, dtype=np.uint8)
        a.connect(relay.address)  # every link up: a large write is striped over all of them
        a.write(src, relay.via(region.descriptor()), imm=5).wait(60)
        b.expect(5).wait(10)
        assert np.array_equal(region.array, src)  # what landed is what was sent
        with pytest.raises(tf.TransferTimeout):  # counted once, never twice
            b.expect(5, timeout=0.3).wait()
        assert relay.tampered() >= 1
    assert "integrity check" in caplog.text


@pytest.mark.parametrize("nbytes", [100, 4096])
def test_a_flipped_byte_in_a_small_write_is_refused_and_resent(relay_factory, caplog,
                                                               nbytes) -> None:
    """A small write's frame arrives whole in the read-ahead buffer, where the owner checks
    its payload's tag in place (not through the streaming path a large payload takes)."""
    caplog.set_level(logging.WARNING, logger="tensorfabric.tcp")
    a, b = _pair()
    with a, b:
        region = b.register(np.zeros(nbytes, np.uint8))
        relay = relay_factory(b, "flip")
        src = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        a.write(src, relay.via(region.descriptor()), imm=6).wait(60)
        b.expect(6).wait(10)
        assert np.array_equal(region.array, src)  # the honest resend overwrote the flip
        with pytest.raises(tf.TransferTimeout):  # counted once
            b.expect(6, timeout=0.3).wait()
        assert relay.tampered() == 1
    assert "payload failed its integrity check" in caplog.text


def test_handshake_cut_off_once_is_tried_again(relay_factory) -> None:
    """An acceptor that gives up on a handshake (its deadline passed on a loaded machine) cuts
    the connection: the first op dials again instead of failing with BrokenError."""
    a, b = _pair()
    with a, b:
        relay = relay_factory(b, "cut")
        a.send(relay.address, b"after a second handshake", tag=4).wait(30)
        assert b.recv(tag=4, timeout=10).data == b"after a second handshake"
        assert relay.tampered() == 1


def test_relay_cannot_rewrite_a_message(relay_factory) -> None:
    old, new = b"France", b"Norway"
    a, b = _pair()
    with a, b:
        relay = relay_factory(b, "replace", f"{old.hex()}:{new.hex()}")
        a.send(relay.address, b"What is the capital of France?", tag=3).wait(30)
        assert b.recv(tag=3, timeout=10).data == b"What is the capital of France?"
        with pytest.raises(tf.TransferTimeout):
            b.recv(tag=3, timeout=0.3)
        assert relay.tampered() == 1


def test_without_integrity_the_same_relay_succeeds(relay_factory) -> None:
    """The control: frames without MACs (integrity=False on both) are rewritten unnoticed."""
    a, b = _pair(integrity=False)
    with a, b:
        relay = relay_factory(b, "replace", f"{b'France'.hex()}:{b'Norway'.hex()}")
        a.send(relay.address, b"What is the capital of France?", tag=3).wait(30)
        assert b.recv(tag=3, timeout=10).data == b"What is the capital of Norway?"


def test_one_side_cannot_turn_integrity_off_alone() -> None:
    with tf.Engine(SECRET, transports=("tcp",), integrity=False) as a, \
            tf.Engine(SECRET, transports=("tcp",)) as b:
        a.connect(b.address)
        # connect() returns once a's side is up; b files the accepted link a moment later
        deadline = time.monotonic() + 30
        while not b._tcp._accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        conn = next(iter(b._tcp._accepted))
        assert conn.rx is not None and conn.tx is not None  # b wanted it: on for the link
        dialled = [c for p in a._tcp._peers.values() for c in p.conns if c]
        assert dialled and all(c.rx is not None and c.tx is not None for c in dialled)


@pytest.mark.parametrize("mode", ["address", "downgrade"])
def test_a_rewritten_hello_is_refused(relay_factory, mode) -> None:
    """A relay that rewrites the hello fails the handshake (the hello is in the transcript
    both proofs cover): ``address`` moves the dial-back endpoint, ``downgrade`` clears the
    payload-MAC flags (counter GMAC, GMAC, Poly1305: the link would fall back to BLAKE2b)."""
    a, b = _pair()
    with a, b:
        region = b.register(np.zeros(64, np.uint8))
        relay = relay_factory(b, mode)
        with pytest.raises(tf.AuthenticationError):
            a.write(b"x" * 64, relay.via(region.descriptor())).wait(30)
        assert not region.array.any()
        assert relay.tampered() == 1


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tls")
    out = {}
    for who in ("server", "relay"):
        key, cert = d / f"{who}.key", d / f"{who}.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        out[f"{who}_key"], out[f"{who}_cert"] = key, cert
    return out


def test_tls_terminating_relay_cannot_pass(relay_factory, certs) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs["server_cert"], certs["server_key"])
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS without a CA: anyone's cert
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with tf.Engine(SECRET, transports=("tcp",), tls_client=client) as a, \
            tf.Engine(SECRET, transports=("tcp",), tls_client=client) as direct, \
            tf.Engine(SECRET, transports=("tcp",), tls_server=server) as b:
        region = b.register(np.zeros(64, np.uint8))
        relay = relay_factory(b, "tls", f"{certs['relay_cert']},{certs['relay_key']}")
        with pytest.raises(tf.AuthenticationError):
            a.write(b"x" * 64, relay.via(region.descriptor())).wait(30)
        assert not region.array.any()
        assert relay.tampered() >= 1  # it did sit in the middle
        direct.write(b"y" * 64, region.descriptor()).wait(30)  # without it: works
        assert bytes(region.array) == b"y" * 64
    assert os.environ.get("TENSORFABRIC_SECRET") != SECRET  # the secret never left the test


@pytest.mark.parametrize("integrity", [True, False])
def test_large_payloads_with_and_without_macs(integrity) -> None:
    """Large payloads (one GMAC call, or streamed over pieces) on every path stay exact."""
    rng = np.random.default_rng(11)
    with tf.Engine(SECRET, transports=("tcp",), integrity=integrity, links=2) as a, \
            tf.Engine(SECRET, transports=("tcp",), integrity=integrity) as b:
        for n in (1 << 20, (5 << 20) + 3):
            msg = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            a.send(b.address, msg, tag=8).wait(30)
            assert b.recv(tag=8, timeout=30).data == msg
        region = b.register(rng.integers(0, 256, 9 << 20, dtype=np.uint8), tf.Access.READ_WRITE)
        out = np.zeros(9 << 20, np.uint8)
        a.read(region.descriptor(), out).wait(30)
        assert np.array_equal(out, region.array)
        src = rng.integers(0, 256, 9 << 20, dtype=np.uint8)
        a.write(src, region.descriptor()).wait(30)
        assert np.array_equal(region.array, src)
        conn = next(iter(b._tcp._accepted))
        assert (conn.rx is not None) == integrity
        # two engines of this version agree on counter GMAC (where cryptography is there)
        from tensorfabric.transports._integrity import have_gmac
        assert not integrity or conn.rx.seq_gmac == conn.tx.seq_gmac == have_gmac()


@pytest.mark.parametrize("kind", ["counter gmac", "gmac", "poly1305", "blake2b"])
def test_each_payload_mac_catches_a_flipped_byte(kind) -> None:
    """Each payload MAC the handshake can agree on: a receiver that MACs the payload in pieces
    gets the sender's tag; one flipped byte, a byte too many or the wrong frame position
    does not."""
    from tensorfabric.transports._integrity import FrameMac, have_gmac, have_poly1305

    if "gmac" in kind and not have_gmac() or kind == "poly1305" and not have_poly1305():
        pytest.skip("needs the integrity extra (cryptography)")
    key = os.urandom(32)
    make = {"counter gmac": lambda: FrameMac(key, False, True, True),
            "gmac": lambda: FrameMac(key, False, True), "poly1305": lambda: FrameMac(key, True),
            "blake2b": lambda: FrameMac(key, False)}[kind]
    head = os.urandom(72)
    payload = np.random.default_rng(3).integers(0, 256, (5 << 20) + 3, dtype=np.uint8)
    tag = make().seal([head, payload[:1000], payload[1000:]])[-1]

    def received(data: np.ndarray, pieces: int, frame: int = 0) -> bytes:
        rx = make()
        for _ in range(frame):
            rx.head(head)
        m = rx.payload(rx.head(head), payload.nbytes)
        for part in np.array_split(data, pieces):
            m.update(part)
        return bytes(m.finalize())

    assert received(payload, 1) == tag and received(payload, 7) == tag
    flipped = payload.copy()
    flipped[123_457] ^= 1
    assert received(flipped, 1) != tag and received(flipped, 7) != tag
    assert received(np.append(payload, np.uint8(0)), 1) != tag
    assert received(payload, 1, frame=1) != tag
