"""Errors raised by :mod:`tensorfabric.kv`."""

from __future__ import annotations

from tensorfabric._errors import TensorFabricError


class KVError(TensorFabricError):
    """Base class of paged-KV and disaggregation errors."""


class KVCacheFullError(KVError):
    """Not enough free blocks for a request (nothing was allocated)."""

    def __init__(self, message: str, *, needed: int = 0, free: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


class BlockStateError(KVError):
    """A block id was freed twice, never allocated, or out of range (a bookkeeping bug)."""


class LayoutMismatchError(KVError):
    """Two workers' KV layouts disagree (model shape, block size or dtype)."""


class PrefillFailedError(KVError):
    """A request's prefill did not complete: the worker died, timed out or reported an error.

    ``request_id`` names the request, ``worker`` the prefill worker's name (if one was chosen),
    ``attempts`` how many prefill workers were tried.
    """

    def __init__(
        self, message: str, *, request_id: int = -1, worker: str | None = None, attempts: int = 0
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.worker = worker
        self.attempts = attempts


class WorkerUnavailableError(KVError):
    """No prefill worker is registered with the decode worker, or a worker did not start."""
