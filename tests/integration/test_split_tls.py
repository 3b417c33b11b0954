"""cloud.tls: the engine links between tiers run over mutual TLS built from the config."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import ssl
import threading
import time
from pathlib import Path

import pytest

import tensorfabric as tf
from tensorfabric.split import parse_config
from tensorfabric.split._rpc import TAG_REPLY, TAG_REQUEST, CloudClient, encode_msg
from tensorfabric.split._tls import tls_contexts

from _tier_relay import Relay


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
    cfg = parse_config({"secret": "s", "cloud": {"tls": {**pki, "enabled": True}}})
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


# ---------------------------------------------------------------- pinned by default, relays

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class MiniCloud:
    """The cloud tier's receive side without a model: records what would reach the model."""

    def __init__(self, engine: tf.Engine) -> None:
        self.engine, self.received = engine, []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                msg = self.engine.recv(tag=TAG_REQUEST, timeout=0.5)
            except tf.TransferTimeout:
                continue
            except tf.TensorFabricError:
                return
            try:
                req = json.loads(msg.data)
            except ValueError:
                continue  # the real tier drops malformed requests too
            if req.get("op") == "cancel":
                continue  # the edge giving up on a request: nothing reaches the model
            if req.get("op") == "ping":
                reply = {"id": req["id"], "event": "pong"}
            else:
                self.received.append(req)
                reply = {"id": req["id"], "event": "done", "finish_reason": "stop"}
            self.engine.send(msg.peer, encode_msg(reply), tag=TAG_REPLY).wait(5)


def pair(tmp: Path, tls: bool):  # type: ignore[no-untyped-def]
    cfg = parse_config({"secret": "s", "cloud": {"tls": {"enabled": tls, "dir": str(tmp)}}})
    srv, cli = tls_contexts(cfg.cloud.tls, enabled=tls)
    kw = {"tls_server": srv, "tls_client": cli, "timeout": 5.0, "transports": ("tcp",),
          "connect_timeout": 2.0}  # fmt: skip
    return tf.Engine("s", name="cloud", **kw), tf.Engine("s", name="edge", **kw)


@pytest.mark.parametrize("tls", [pytest.param(False, id="plain"), pytest.param(True, id="tls")])
@pytest.mark.parametrize("mode", ["rewrite", "flip", "replay"])
def test_relay_attacks_never_reach_the_model(tmp_path: Path, mode: str, tls: bool) -> None:
    """A relay between edge and cloud that does not know the secret changes "France" to
    "Norway", flips a bit, or sends every chunk twice: the cloud's model sees the edge's request
    exactly, or nothing: TLS and, on the plain link, the engine's per-frame MACs with sequence
    numbers stop all three."""
    cloud_e, edge_e = pair(tmp_path, tls)
    with cloud_e, edge_e, Relay(cloud_e.endpoints[0], mode) as relay:
        cloud = MiniCloud(cloud_e)
        client = CloudClient(edge_e, relay.address_via(cloud_e.address), dead_after=3.0)
        try:
            assert client.ping(timeout=10)  # links up before the attack
            relay.arm()
            with contextlib.suppress(tf.TensorFabricError):
                list(client.stream("chat", 8.0, messages=QUESTION))
            time.sleep(1.0)
        finally:
            client.close()
        assert all(r.get("messages") == QUESTION for r in cloud.received), cloud.received
        assert len(cloud.received) <= 1  # a replayed request is not served twice
        if tls:
            assert b"France" not in relay.up  # the relay cannot even see it
        if mode != "rewrite" or not tls:
            assert relay.tampered, "the attack did not happen"


def test_tls_terminating_relay_is_refused_and_reads_nothing(tmp_path: Path) -> None:
    """A man in the middle with its own self-signed certificate: the edge pins the tiers'
    pair, refuses the handshake, and the relay gets no plaintext."""
    from tensorfabric.split._tls import ensure_pair

    cloud_e, edge_e = pair(tmp_path / "tiers", True)
    mcert, mkey = ensure_pair(tmp_path / "mitm")
    m_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    m_server.load_cert_chain(mcert, mkey)
    m_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    m_client.check_hostname, m_client.verify_mode = False, ssl.CERT_NONE
    m_client.load_cert_chain(mcert, mkey)
    with cloud_e, edge_e, Relay(cloud_e.endpoints[0], "mitm", mitm_server=m_server, mitm_client=m_client) as relay:
        MiniCloud(cloud_e)
        client = CloudClient(edge_e, relay.address_via(cloud_e.address), dead_after=2.0)
        try:
            assert not client.ping(timeout=5)
            with pytest.raises(tf.TensorFabricError):
                list(client.stream("chat", 4.0, messages=QUESTION))
        finally:
            client.close()
        assert relay.up == b"" and relay.down == b""


def test_tls_is_on_by_default_off_loopback_and_off_is_loud(capsys: pytest.CaptureFixture[str]) -> None:
    from tensorfabric.split._tls import tls_wanted

    assert not tls_wanted(parse_config({}))
    assert tls_wanted(parse_config({"cloud": {"host": "10.1.2.3"}}))
    assert tls_wanted(parse_config({}), ("192.0.2.7",))  # dialling a remote cloud
    assert not tls_wanted(parse_config({"cloud": {"host": "10.1.2.3", "tls": {"enabled": False}}}))
    assert "WARNING: cloud.tls.enabled is false" in capsys.readouterr().err


def test_unpinned_peer_certificate_is_refused(tmp_path: Path) -> None:
    """Two tiers with different self-signed pairs and no ca/pin trust nothing of each other."""
    a_cfg = parse_config({"secret": "s", "cloud": {"tls": {"enabled": True, "dir": str(tmp_path / "a")}}})
    b_cfg = parse_config({"secret": "s", "cloud": {"tls": {"enabled": True, "dir": str(tmp_path / "b")}}})
    a_srv, a_cli = tls_contexts(a_cfg.cloud.tls)
    b_srv, b_cli = tls_contexts(b_cfg.cloud.tls)
    with tf.Engine("s", tls_server=a_srv, tls_client=a_cli, connect_timeout=2, timeout=3) as a, \
            tf.Engine("s", tls_server=b_srv, tls_client=b_cli, connect_timeout=2, timeout=3) as b:
        with pytest.raises(tf.TensorFabricError):
            b.send(a.address, b"x", tag=TAG_REQUEST).wait(5)
    # pinning the other's fingerprint (plus trusting its cert) makes them talk
    from tensorfabric.split._tls import fingerprint

    a_cert = (tmp_path / "a" / "tier-cert.pem").read_bytes()
    with pytest.raises(Exception, match="not one of cloud.tls.pin|certificate verify failed"):
        bad = parse_config({"cloud": {"tls": {"enabled": True, "dir": str(tmp_path / "a"),
                                              "pin": ["sha256:" + "0" * 64]}}})  # fmt: skip
        s2, c2 = tls_contexts(bad.cloud.tls)
        with tf.Engine("s", tls_server=a_srv, tls_client=a_cli, timeout=3) as a, \
                tf.Engine("s", tls_server=s2, tls_client=c2, connect_timeout=2, timeout=3) as c:
            c.send(a.address, b"x", tag=TAG_REQUEST).wait(5)
            raise AssertionError("a wrong pin was accepted")
    assert fingerprint(a_cert).startswith("sha256:")
