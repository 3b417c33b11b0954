"""TLS on the engine links between edge and cloud: on by default off loopback, always verified.

``cloud.tls.enabled``: ``auto`` (default) turns TLS on whenever a tier listens on or dials a
non-loopback address; ``true`` / ``false`` force it (``false`` off loopback logs a loud warning).

Trust is pinned, never "any certificate": each side requires the peer's certificate (both tiers
accept and dial links, so both present and check one) and trusts only ``cloud.tls.ca`` (a CA, or
the peer's own self-signed certificate) or, without ``ca``, its own certificate: the shared-pair
setup, where both tiers hold the same pair. ``cloud.tls.pin`` (``sha256:HEX`` fingerprints)
narrows trust further to exactly those certificates. Without ``cert``/``key`` a self-signed
pair is generated once into ``cloud.tls.dir`` (a local deployment makes a fresh one per run).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from ._errors import SplitConfigError

__all__ = ["PinnedContext", "ensure_pair", "fingerprint", "tls_contexts", "tls_wanted"]

log = logging.getLogger("tensorfabric.split.tls")

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a DNS name: assume it leaves the host


def tls_wanted(cfg: Any, peer_hosts: tuple[str, ...] = ()) -> bool:
    """Whether the tier links use TLS: ``enabled`` true/false, or ``auto`` = any listen or
    dialled address (``peer_hosts``: the other tier's endpoints) is not loopback."""
    t = cfg.cloud.tls
    hosts = (cfg.cloud.host, cfg.edge.host, *peer_hosts)
    off_loopback = [h for h in hosts if not is_loopback(h)]
    if t.enabled == "auto":
        return bool(off_loopback or t.cert)
    if not t.enabled and off_loopback:
        msg = (f"WARNING: cloud.tls.enabled is false but the tier link uses {off_loopback[0]}: "
               "prompts and answers cross the network in plain text, readable and changeable "
               "by anyone on the path. Remove 'enabled: false' to encrypt and pin the link.")  # fmt: skip
        log.warning(msg)
        print(msg, file=sys.stderr, flush=True)
    return bool(t.enabled)


def fingerprint(cert_pem_or_der: bytes) -> str:
    """``sha256:HEX`` of a certificate (PEM or DER)."""
    der = cert_pem_or_der
    if b"-----BEGIN" in der:
        der = ssl.PEM_cert_to_DER_cert(der.decode())
    return "sha256:" + hashlib.sha256(der).hexdigest()


def default_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "tensorfabric" / "tls"


def ensure_pair(directory: str | os.PathLike[str]) -> tuple[str, str]:
    """(cert, key) paths of a self-signed pair in ``directory``, generated on first use."""
    d = Path(directory)
    cert, key = d / "tier-cert.pem", d / "tier-key.pem"
    if cert.exists() and key.exists():
        return str(cert), str(key)
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("generating a TLS pair needs cryptography: pip install 'tensorfabric[serve]'") from exc
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tensorfabric tier")])
    pk = ec.generate_private_key(ec.SECP256R1())
    crt = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pk.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("tensorfabric-tier")]), critical=False)
        .sign(pk, hashes.SHA256())
    )  # fmt: skip
    tmp_key = key.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()))  # fmt: skip
    tmp_key.replace(key)
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    log.warning("generated a self-signed TLS pair for the tier link in %s (%s)", d,
                fingerprint(cert.read_bytes()))  # fmt: skip
    return str(cert), str(key)


class PinnedContext(ssl.SSLContext):
    """An SSLContext that, after the handshake, also requires the peer certificate's SHA-256
    fingerprint to be one of ``pins`` (certificate pinning on top of chain verification)."""

    pins: frozenset[str] = frozenset()

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        if self.pins:
            der = sock.getpeercert(binary_form=True)
            if der is None or fingerprint(der) not in self.pins:
                sock.close()
                raise ssl.SSLCertVerificationError(
                    f"the peer's certificate {fingerprint(der) if der else '(none)'} is not one "
                    "of cloud.tls.pin"
                )
        return sock


def _context(purpose: int, cert: str, key: str, trust: str, pins: frozenset[str]) -> ssl.SSLContext:
    ctx = PinnedContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(trust)
    ctx.check_hostname = False  # trust is the pinned certificate / CA, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.pins = pins
    return ctx


def tls_contexts(tls: Any, *, enabled: bool = True) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) contexts for an engine from a ``cloud.tls`` section, or (None, None).

    Both verify the peer's certificate against ``ca`` (or this side's own certificate) and the
    ``pin`` list. A missing ``cert``/``key`` is generated into ``dir``.
    """
    if not enabled:
        return None, None
    cert, key = tls.cert, tls.key
    if not cert:
        cert, key = ensure_pair(tls.dir or default_dir())
    pins = frozenset(p.lower() for p in (tls.pin or []))
    bad = [p for p in pins if not p.startswith("sha256:") or len(p) != 71]
    if bad:
        raise SplitConfigError(f"cloud.tls.pin: {bad[0]!r} is not 'sha256:' + 64 hex digits")
    try:
        server = _context(ssl.PROTOCOL_TLS_SERVER, cert, key, tls.ca or cert, pins)
        client = _context(ssl.PROTOCOL_TLS_CLIENT, cert, key, tls.ca or cert, pins)
    except (OSError, ssl.SSLError) as exc:
        raise SplitConfigError(
            f"cloud.tls: cannot load certificate/key/CA ({exc}); check the paths and that the "
            "key matches the certificate"
        ) from exc
    return server, client
