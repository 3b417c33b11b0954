"""Errors raised by :mod:`tensorfabric.models`."""

from __future__ import annotations

import tensorfabric

# The engine's error tree lives in the top-level package; fall back to a local root only while
# a checkout predates it, so this module never breaks ``import tensorfabric.models``.
_Base: type[Exception] = getattr(tensorfabric, "TensorFabricError", Exception)


class ModelError(_Base):  # type: ignore[valid-type,misc]
    """Base class of model loading and generation errors."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model name or path does not point at a loadable checkpoint."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ModelLoadError(ModelError):
    """The checkpoint exists but transformers could not load it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
