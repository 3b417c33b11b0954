"""cloud.tls: the engine links between tiers run over mutual TLS built from the config."""

from __future__ import annotations

import datetime
import ipaddress
import json
import threading
from pathlib import Path

import pytest

import tensorfabric as tf
from tensorfabric.split import parse_config
from tensorfabric.split._rpc import TAG_REPLY, TAG_REQUEST, CloudClient, encode_msg
from tensorfabric.split._tls import tls_contexts


def make_pki(d: Path) -> dict[str, str]:
    """A CA and one node certificate for 127.0.0.1, written as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str):  # type: ignore[no-untyped-def]
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("tf-test-ca")).issuer_name(name("tf-test-ca"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("node")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem = serialization.Encoding.PEM
    files = {"ca": d / "ca.pem", "cert": d / "node.pem", "key": d / "node.key"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(cert.public_bytes(pem))
    files["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
    return {k: str(v) for k, v in files.items()}


def test_rpc_over_mutual_tls_and_plain_peer_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    cfg = parse_config({"secret": "s", "cloud": {"tls": pki}})
    server_ctx, client_ctx = tls_contexts(cfg.cloud.tls)
    assert server_ctx is not None and client_ctx is not None
    kw = {"tls_server": server_ctx, "tls_client": client_ctx, "timeout": 5.0}
    with tf.Engine("s", name="cloud", **kw) as cloud, tf.Engine("s", name="edge", **kw) as edge:
        client = CloudClient(edge, cloud.address)
        try:
            # a minimal cloud loop: answer one ping over the TLS links
            def answer() -> None:
                msg = cloud.recv(tag=TAG_REQUEST, timeout=10)
                rid = json.loads(msg.data)["id"]
                cloud.send(msg.peer, encode_msg({"id": rid, "event": "pong"}), tag=TAG_REPLY).wait(10)

            th = threading.Thread(target=answer)
            th.start()
            assert client.ping(timeout=10)
            th.join(10)
        finally:
            client.close()
        # A peer without TLS cannot talk to the TLS engine.
        with tf.Engine("s", name="plain", timeout=3.0, connect_timeout=2.0) as plain:
            with pytest.raises(tf.TensorFabricError):
                plain.send(cloud.address, b"x", tag=TAG_REQUEST).wait(5)
