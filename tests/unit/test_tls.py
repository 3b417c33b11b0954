"""Links encrypted with TLS between engines (the HMAC handshake runs inside)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tensorfabric as tf


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    d: Path = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client


def test_tls_links_carry_every_op(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client = contexts
    with tf.Engine("s", transports=("tcp",), tls_client=client, links=2) as a, \
            tf.Engine("s", transports=("tcp",), tls_server=server) as b:
        dst = b.register(np.zeros(9 << 20, np.uint8))
        src = np.random.default_rng(1).integers(0, 256, 9 << 20, dtype=np.uint8)
        a.write(src, dst.descriptor(), imm=4).wait(30)
        b.expect(4).wait(10)
        assert np.array_equal(dst.array, src)
        out = np.zeros(9 << 20, np.uint8)
        a.read(dst.descriptor(), out).wait(30)
        assert np.array_equal(out, src)
        a.send(b.address, b"hello", tag=2).wait(10)
        assert b.recv(tag=2, timeout=10).data == b"hello"


def test_plaintext_client_cannot_talk_to_tls_server(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, _ = contexts
    with tf.Engine("s", transports=("tcp",), connect_timeout=2) as a, \
            tf.Engine("s", transports=("tcp",), tls_server=server) as b:
        dst = b.register(np.zeros(10, np.uint8))
        with pytest.raises(tf.TransportError):
            a.write(b"x", dst.descriptor()).wait(10)
        assert not dst.array.any()
