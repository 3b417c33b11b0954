"""Turning user buffers into flat byte memoryviews, without copying."""

from __future__ import annotations

import sys
from typing import Any, Union

import numpy as np

from ._errors import ConfigError

#: Anything tensorfabric accepts as memory: bytes-like objects, numpy arrays, CPU torch tensors.
Buffer = Union[bytes, bytearray, memoryview, np.ndarray, Any]


def _torch_tensor_to_numpy(obj: Any) -> np.ndarray | None:
    """A numpy view of a CPU torch tensor sharing its memory, or None if ``obj`` is not one."""
    torch = sys.modules.get("torch")  # never import torch ourselves: it is optional
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    if obj.device.type != "cpu":
        raise ConfigError(
            f"tensor on device {obj.device} cannot be registered with the host transports; "
            "copy it to the CPU or use a GPU-capable transport (cuda_ipc, nixl)"
        )
    if not obj.is_contiguous():
        raise ConfigError("torch tensor is not contiguous; call .contiguous() first")
    flat = obj.detach().reshape(-1)
    # view as bytes so every dtype (bfloat16 included, which numpy lacks) works
    return flat.view(torch.uint8).numpy()


_READ_ONLY = "buffer is read-only but remote writes (or reads into it) need write access"


def as_bytes_view(obj: Buffer, *, writable: bool) -> memoryview:
    """Return a 1-D ``uint8`` memoryview over ``obj``'s memory (no copy).

    Raises :class:`ConfigError` for objects that are not contiguous buffers, or read-only ones
    when ``writable`` is asked.
    """
    if isinstance(obj, np.ndarray) and obj.size:  # the per-op fast path: no reshaped views made
        try:
            mv = memoryview(obj)  # type: ignore[arg-type]
            flat = mv if mv.ndim == 1 and mv.format == "B" and mv.c_contiguous else mv.cast("B")
        except (TypeError, ValueError):
            pass  # dtypes the buffer protocol or cast() refuse: the reshape path below
        else:
            if writable and flat.readonly:
                raise ConfigError(_READ_ONLY)
            return flat
    if isinstance(obj, (bytes, bytearray)):
        mv = memoryview(obj)
    elif isinstance(obj, memoryview):
        mv = obj
    else:
        arr = _torch_tensor_to_numpy(obj)
        if arr is not None:
            mv = memoryview(arr)  # type: ignore[arg-type]
        elif isinstance(obj, np.ndarray):
            if not obj.flags.c_contiguous:
                raise ConfigError("numpy array is not C-contiguous; use np.ascontiguousarray")
            mv = memoryview(obj.reshape(-1).view(np.uint8)) if obj.size else memoryview(b"")  # type: ignore[arg-type]
        else:
            try:
                mv = memoryview(obj)
            except TypeError:
                raise ConfigError(
                    f"{type(obj).__name__} is not a buffer: pass a numpy array, bytearray, "
                    "memoryview or CPU torch tensor"
                ) from None
    if not mv.contiguous:
        raise ConfigError("buffer is not contiguous")
    if writable and mv.readonly:
        raise ConfigError(_READ_ONLY)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv
