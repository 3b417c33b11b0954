"""Cluster-secret authentication: a mutual HMAC-SHA256 challenge-response.

Each side proves it knows the secret by MACing the other side's fresh nonce, so a recorded
handshake cannot be replayed and neither side ever sends the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from ._errors import AuthenticationError

SECRET_ENV = "TENSORFABRIC_SECRET"
NONCE_BYTES = 32
MAC_BYTES = 32


def resolve_secret(secret: str | bytes | None) -> bytes:
    """The cluster secret from the argument, else from ``$TENSORFABRIC_SECRET``."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV)
    if secret is None or len(secret) == 0:
        raise AuthenticationError(
            "no cluster secret: pass Engine(secret=...) or set the environment variable "
            f"{SECRET_ENV} to the same value on every peer"
        )
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def prove(secret: bytes, role: bytes, their_nonce: bytes, my_nonce: bytes, ids: bytes) -> bytes:
    return hmac.new(secret, role + their_nonce + my_nonce + ids, hashlib.sha256).digest()


def check(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
