"""Errors raised by :mod:`tensorfabric.models`."""

from __future__ import annotations

from tensorfabric._errors import TensorFabricError


class ModelError(TensorFabricError):
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
