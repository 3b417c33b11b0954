"""The error tree. Every error the engine raises is a :class:`TensorFabricError`.

::

    TensorFabricError
    ├── ConfigError (also ValueError)        bad argument or configuration
    ├── AccessError                          bad key, out of bounds, not permitted, unknown region
    ├── TransferTimeout (also TimeoutError)  a wait ran past its deadline
    ├── CancelledError                       the transfer was cancelled by its owner
    └── TransportError                       the fabric failed
        ├── ClosedError                      you closed the engine (or region) it used
        ├── BrokenError                      peer or network failure; the cause in __cause__
        ├── AuthenticationError              the peer could not prove the cluster secret
        └── ProtocolError                    a malformed or hostile frame
"""

from __future__ import annotations


class TensorFabricError(Exception):
    """Root of every error raised by tensorfabric.

    Errors carry what is known about the failed operation as attributes, so a caller can act on
    them without parsing the message: ``peer`` (the remote engine's name or address),
    ``region`` (region id), ``offset`` and ``nbytes``.
    """

    def __init__(
        self,
        message: str,
        *,
        peer: str | None = None,
        region: int | None = None,
        offset: int | None = None,
        nbytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.peer = peer
        self.region = region
        self.offset = offset
        self.nbytes = nbytes


class ConfigError(TensorFabricError, ValueError):
    """An argument or a configuration value is invalid."""


class AccessError(TensorFabricError):
    """A remote access was refused: wrong key, out of bounds, not permitted, or no such region.

    Nothing was written to the destination when this is raised for a write.
    """


class TransferTimeout(TensorFabricError, TimeoutError):
    """An operation, or a wait on it, did not complete before its deadline."""


class CancelledError(TensorFabricError):
    """The operation was cancelled with :meth:`Transfer.cancel`."""


class TransportError(TensorFabricError):
    """The fabric failed to carry an operation."""


class ClosedError(TransportError):
    """The engine or region used by the operation was closed by its owner (you)."""


class BrokenError(TransportError):
    """The peer or the network failed (peer died, connection reset, every link down)."""


class AuthenticationError(TransportError):
    """A peer failed the cluster-secret handshake, or no secret was configured."""


class ProtocolError(TransportError):
    """A peer sent a malformed, truncated or oversized frame; that connection was closed."""


__all__ = [
    "AccessError",
    "AuthenticationError",
    "BrokenError",
    "CancelledError",
    "ClosedError",
    "ConfigError",
    "ProtocolError",
    "TensorFabricError",
    "TransferTimeout",
    "TransportError",
]
