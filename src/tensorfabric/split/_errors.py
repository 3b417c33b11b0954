"""Errors of the split (edge/cloud) layer, rooted in the engine's error tree."""

from __future__ import annotations

from .._errors import ConfigError, TensorFabricError


class SplitError(TensorFabricError):
    """Base class of edge/cloud serving errors."""


class SplitConfigError(SplitError, ConfigError):
    """The deployment config is invalid; the message names the key and what is allowed."""


class CloudUnavailable(SplitError):
    """The cloud tier did not answer (down, unreachable, too slow, or its breaker is open)."""


class Overloaded(SplitError):
    """Too many requests are waiting at this tier; retry later (HTTP 429/503)."""


class QueueFull(Overloaded):
    """The tier's queue is too long for this request to finish within ``server.request_timeout``:
    refused at once (HTTP 429 with ``Retry-After``) instead of waiting to time out."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequest(SplitError):
    """The request cannot be served as asked (too long for the context, a bad parameter): the
    client's fault, answered 400."""


class CloudRequestError(InvalidRequest):
    """The cloud tier refused a request for its content (a bad parameter): the client's fault,
    answered 400, and never counted against the cloud's health."""


class CloudFailed(CloudUnavailable):
    """The cloud tier answered, with an error of its own: it is alive, so its health (the
    breaker) is not touched; the edge answers this request instead."""
