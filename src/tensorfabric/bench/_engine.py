"""Building the engines ``tensorfabric bench`` measures, from command-line style options."""

from __future__ import annotations

import os
from typing import Any

BENCH_SECRET_ENV = "TENSORFABRIC_SECRET"
_DEFAULT_SECRET = "tensorfabric-bench"
KNOWN_TRANSPORTS = ("tcp", "shm", "nixl", "tcp-plain", "tcp-tls")
#: tcp variants for ``--integrity``: frame MACs off (the plain link), TLS (self-signed, bound)
INTEGRITY_TRANSPORTS = ("tcp-plain", "tcp", "tcp-tls")


def bench_secret() -> str:
    """The cluster secret: ``$TENSORFABRIC_SECRET``, else a fixed one for local benchmark runs."""
    return os.environ.get(BENCH_SECRET_ENV) or _DEFAULT_SECRET


def engine_from_options(
    *, host: str = "127.0.0.1", port: int = 0, transport: str = "tcp", links: int = 1,
    link_addrs: list[str] | None = None, name: str = "bench", timeout: float = 60.0,
    chunk_bytes: int | None = None, link_timeout: float | None = None,
) -> Any:
    """An :class:`tensorfabric.Engine` restricted to ``transport`` with the given links.

    ``link_addrs`` lists the local addresses of this engine's NICs: it listens on each (so a
    peer's link ``i`` arrives on NIC ``i``) and binds its own link ``i`` to entry ``i``; when
    given it sets the link count.
    """
    import tensorfabric as tf

    if transport not in KNOWN_TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}: use one of {KNOWN_TRANSPORTS}")
    # shm moves the data into shared-memory regions; control messages still go over tcp.
    transports = {"tcp": ("tcp",), "shm": ("shm", "tcp"), "nixl": ("nixl", "tcp"),
                  "tcp-plain": ("tcp",), "tcp-tls": ("tcp",)}[transport]
    kwargs: dict[str, Any] = dict(secret=bench_secret(), timeout=timeout, name=name,
                                  transports=transports)
    if transport == "tcp-plain":
        kwargs["integrity"] = False
    if transport == "tcp-tls":
        kwargs["tls_server"], kwargs["tls_client"] = _bench_tls()
    if chunk_bytes:
        kwargs["chunk_bytes"] = chunk_bytes
    if link_timeout:
        kwargs["link_timeout"] = link_timeout
    if link_addrs:
        kwargs["links"] = list(link_addrs)
        kwargs["listen"] = [(a, port if i == 0 else 0) for i, a in enumerate(link_addrs)]
    else:
        kwargs.update(host=host, port=port, links=links)
    return tf.Engine(**kwargs)


def _bench_tls() -> tuple[Any, Any]:
    """TLS contexts from a self-signed certificate kept in the temp directory (made once with
    the ``openssl`` command; both benchmark processes use the same one)."""
    import ssl
    import subprocess
    import tempfile
    from pathlib import Path

    d = Path(tempfile.gettempdir()) / f"tensorfabric-bench-tls-{os.getuid()}"
    cert, key = d / "cert.pem", d / "key.pem"
    if not cert.exists():
        d.mkdir(mode=0o700, exist_ok=True)
        tmp = d / f"tmp-{os.getpid()}"
        tmp.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                        "-subj", "/CN=tensorfabric-bench", "-keyout", str(tmp / "key.pem"),
                        "-out", str(tmp / "cert.pem")], check=True, capture_output=True)
        os.replace(tmp / "key.pem", key)
        os.replace(tmp / "cert.pem", cert)
        tmp.rmdir()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    client.check_hostname = False  # the bench peers may listen on any address
    return server, client
