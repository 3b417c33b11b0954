"""Argument checks shared by the engine's operations: every offset, length, page index and
immediate is checked here, in Python integers (no wraparound), before anything is sent."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._errors import AccessError, ConfigError
from ._region import RegionDescriptor

_U64 = (1 << 64) - 1


def _nonneg(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _imm(value: int | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or not 0 <= value <= _U64:
        raise ConfigError(f"immediate must be an int in [0, 2**64), got {value!r}")
    return int(value)


def _index_array(name: str, pages: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(pages)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ConfigError(f"{name} must be a 1-D sequence of page indices")
    if arr.size and int(arr.min()) < 0:
        raise ConfigError(f"{name} has a negative page index")
    return arr.astype(np.uint64)


def _check_range(what: str, offset: int, nbytes: int, size: int) -> None:
    _nonneg(f"{what} offset", offset)
    _nonneg("nbytes", nbytes)
    if offset + nbytes > size:
        raise ConfigError(f"{what} range [{offset}, {offset + nbytes}) is outside its "
                          f"{size}-byte buffer", offset=offset, nbytes=nbytes)


def _check_dst_range(desc: RegionDescriptor, offset: int, nbytes: int) -> None:
    _nonneg("dst_offset", offset)
    _nonneg("nbytes", nbytes)
    if offset + nbytes > desc.nbytes:
        raise AccessError(f"write of {nbytes} bytes at {offset} is outside the peer's "
                          f"{desc.nbytes}-byte region {desc.region_id}", region=desc.region_id,
                          offset=offset, nbytes=nbytes)


def _parse_endpoint(spec: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(spec, tuple):
        return spec[0], int(spec[1])
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, 0
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ConfigError(f"bad listen address {spec!r}: expected HOST:PORT") from None
