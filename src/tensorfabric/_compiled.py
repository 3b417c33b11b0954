"""The optional compiled kernels (``tensorfabric._native``, built from ``_native.c`` by
``pip install -e .`` where a C compiler is present), or ``None``: callers then run their numpy
path, which gives the same results. ``TENSORFABRIC_NATIVE=0`` turns the kernels off (the
tests run both paths that way)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("TENSORFABRIC_NATIVE", "1").strip() == "0":
        return None
    try:
        return importlib.import_module("tensorfabric._native")
    except ImportError:
        return None


#: the kernels module, or None (not built, or turned off); tests may set it to None
native: ModuleType | None = _load()
