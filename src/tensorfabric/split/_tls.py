"""TLS contexts for the engine links between edge and cloud hosts (mutual authentication)."""

from __future__ import annotations

import ssl
from typing import Any

from ._errors import SplitConfigError

__all__ = ["tls_contexts"]


def tls_contexts(tls: Any) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) contexts from a ``cloud.tls`` config section, or (None, None).

    Both tiers accept and dial links (replies are dialled back), so each side gets both
    contexts from the same ``cert``/``key`` (its own) and ``ca`` (who it trusts). With ``ca``
    the peer's certificate is required and checked, including its host name / IP.
    """
    if not tls.cert:
        return None, None
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(tls.cert, tls.key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        client.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            server.load_verify_locations(tls.ca)
            server.verify_mode = ssl.CERT_REQUIRED
            client.load_verify_locations(tls.ca)
        else:
            # No CA given: encryption only. The shared secret still authenticates the peer.
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        raise SplitConfigError(
            f"cloud.tls: cannot load certificate/key/CA ({exc}); check the paths and that the "
            "key matches the certificate"
        ) from exc
    return server, client
