"""numpy and CPU torch tensors as raw rows, and back, without copies.

The fabric moves token rows as bytes, so every dtype (bfloat16 included, which numpy lacks)
travels the same way: a torch bfloat16 tensor is seen through its int16 view.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _compiled
from .._errors import ConfigError

#: dtype names accepted by ExpertParallel, with their size in bytes
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _torch() -> Any:
    return sys.modules.get("torch")  # never import torch ourselves: it is optional


@dataclass(frozen=True)
class Kind:
    """What the caller handed us: numpy or torch, and the element dtype name."""

    torch: bool
    dtype: str


def dtype_name(obj: Any) -> str:
    """The dtype name ("float32", "float16", "bfloat16") of a numpy dtype, a torch dtype or a
    string."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.dtype):
        name = str(obj).removeprefix("torch.")
    else:
        try:
            name = np.dtype(obj).name
        except TypeError:
            name = str(obj)
    if name not in DTYPES:
        raise ConfigError(f"dtype {obj!r} is not supported; use one of {sorted(DTYPES)}")
    return name


def rows(x: Any, what: str, width: int) -> tuple[np.ndarray, Kind]:
    """A 2-D numpy view of ``x`` ([n, width] elements) and what ``x`` was.

    bfloat16 torch tensors come back as their int16 bits; nothing is copied.
    """
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ConfigError(f"{what} is on {x.device}; MoE dispatch takes CPU tensors")
        if x.dim() != 2 or x.shape[1] != width:
            raise ConfigError(f"{what} must have shape [n, {width}], got {tuple(x.shape)}")
        name = dtype_name(x.dtype)
        t = x.detach().contiguous()
        arr = (t.view(torch.int16) if name == "bfloat16" else t).numpy()
        return arr, Kind(True, name)
    if not isinstance(x, np.ndarray):
        raise ConfigError(f"{what} must be a numpy array or a CPU torch tensor, got "
                          f"{type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != width:
        raise ConfigError(f"{what} must have shape [n, {width}], got {x.shape}")
    return np.ascontiguousarray(x), Kind(False, dtype_name(x.dtype))


def plain(x: Any, what: str) -> np.ndarray:
    """A numpy view (or copy) of a small index or weight array, torch or numpy."""
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ConfigError(f"{what} is on {x.device}; MoE dispatch takes CPU tensors")
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds elements of ``name`` (bfloat16 as int16 bits)."""
    return np.dtype(np.int16 if name == "bfloat16" else name)


def wrap(arr: np.ndarray, kind: Kind) -> Any:
    """``arr`` (numpy, elements of ``kind.dtype``) as the caller's type, sharing memory."""
    if not kind.torch:
        return arr
    torch = _torch()
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if kind.dtype == "bfloat16" else t


def split_rows(x: Any, counts: np.ndarray, kind: Kind) -> list[Any]:
    """``x`` cut into consecutive views of ``counts[i]`` rows (torch: one ``split`` call,
    about ten times cheaper than slicing a tensor per expert)."""
    if kind.torch:
        return list(x.split(counts.tolist()))
    return np.split(x, np.cumsum(counts[:-1]))


def as_index(idx: np.ndarray, kind: Kind) -> Any:
    """``idx`` (int64) as a torch tensor for torch callers (so that ``rows[idx]`` is a torch
    gather), sharing memory, and as itself otherwise."""
    return _torch().from_numpy(idx) if kind.torch else idx


def gather(dst: np.ndarray, table: np.ndarray, idx: np.ndarray, *,
           alias: tuple[int, np.ndarray, np.ndarray] | None = None) -> None:
    """``dst[:len(idx)] = table[idx]``, rows of bytes.

    ``alias=(base, src, rows)``: rows ``base .. base + len(rows)`` of ``table`` are to be
    ``src[rows]``; the compiled kernel reads them from ``src`` where they are, the numpy path
    copies them into ``table`` first."""
    nat = _compiled.native
    if nat is not None:
        idx64, src = _past_the_table(idx, len(table), alias)
        nat.gather_rows(dst, table, idx64, table.shape[1], src)
        return
    _copy_aliased(table, alias)
    np.take(table, idx, axis=0, out=dst[:len(idx)], mode="clip")


def _past_the_table(idx: np.ndarray, rows: int, alias: tuple[int, np.ndarray, np.ndarray] | None,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """``idx`` as int64 with the aliased rows pointing past the table's ``rows`` into
    ``src`` (the kernels' second table), and ``src`` (None without an alias)."""
    idx64 = np.ascontiguousarray(idx, dtype=np.int64)
    if alias is None or not len(alias[2]):
        return idx64, None
    base, src, which = alias
    mine = (idx64 >= base) & (idx64 < base + len(which))
    if mine.any():
        idx64 = idx64.copy()
        idx64[mine] = rows + which[idx64[mine] - base]
    return idx64, src


def _copy_aliased(table: np.ndarray, alias: tuple[int, np.ndarray, np.ndarray] | None) -> None:
    """The numpy paths: put the aliased rows into the table (as bytes) where they stand."""
    if alias is not None and len(alias[2]):
        base, src, which = alias
        rows = table.view(np.uint8).reshape(len(table), -1)
        np.take(src, which, axis=0, out=rows[base:base + len(which)], mode="clip")


_NATIVE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def weighted_sum(table: np.ndarray, pos: np.ndarray, weights: np.ndarray, kind: Kind, *,
                 alias: tuple[int, np.ndarray, np.ndarray] | None = None) -> Any:
    """sum over k of ``weights[:, k] * table[pos[:, k]]``, accumulated in float32.

    ``table`` is [R, H] in the element dtype (bfloat16 as int16 bits), ``pos`` [T, K] row
    indices into it (made by ``plan_dispatch``); the result is [T, H] in the caller's type and
    dtype. From zero, each slot's product is rounded to float32, then added in k order (a
    multiply, then an add, no fused multiply-add), so float32 equals a reference layer that
    accumulates the same way bit for bit; float16 and bfloat16 rows are widened to float32,
    summed the same way and rounded once (to nearest even). The compiled kernel
    (``tensorfabric._native``) does it in one pass over the rows; without it, numpy gathers a
    few tokens at a time into scratch.

    ``alias=(base, src, idx)``: rows ``base .. base + len(idx)`` of ``table`` are to be
    ``src[idx]`` (``src`` [n, H * itemsize] bytes); the kernel reads them from ``src`` where
    they are, the numpy path copies them into ``table`` first.
    """
    nat = _compiled.native
    if nat is not None and (kind.dtype != "float16" or nat.HAVE_FLOAT16):
        return _weighted_sum_native(nat, table, pos, weights, kind, alias)
    _copy_aliased(table, alias)
    T, K = pos.shape
    H = table.shape[1]
    w32 = np.ascontiguousarray(weights, dtype=np.float32)
    chunk = max(1, (4 << 20) // max(1, K * H * 4))
    n = min(chunk, max(T, 1))
    scratch = np.empty((n, K, H), table.dtype)
    wide = scratch if kind.dtype == "float32" else np.empty((n, K, H), np.float32)
    acc = np.empty((T, H), np.float32)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        g = np.take(table, pos[t0:t1], axis=0, out=scratch[:t1 - t0], mode="clip")
        f = g if kind.dtype == "float32" else wide[:t1 - t0]
        if kind.dtype == "bfloat16":  # bfloat16 is the top half of a float32
            np.left_shift(g.view(np.uint16), 16, out=f.view(np.uint32), dtype=np.uint32)
        elif kind.dtype == "float16":
            np.copyto(f, g, casting="unsafe")
        _accumulate_in_order(acc[t0:t1], f, w32[t0:t1])
    torch = _torch() if kind.torch else None
    if torch is not None:
        out = torch.from_numpy(acc)
        return out if kind.dtype == "float32" else out.to(getattr(torch, kind.dtype))
    if kind.dtype == "float32":
        return acc
    with np.errstate(over="ignore"):
        return acc.astype(kind.dtype)


def _weighted_sum_native(nat: Any, table: np.ndarray, pos: np.ndarray, weights: np.ndarray,
                         kind: Kind, alias: tuple[int, np.ndarray, np.ndarray] | None) -> Any:
    T, H = pos.shape[0], table.shape[1]
    w32 = np.ascontiguousarray(weights, dtype=np.float32)
    pos64, src = _past_the_table(pos, len(table), alias)
    torch = _torch() if kind.torch else None
    if torch is not None:
        out = torch.empty((T, H), dtype=getattr(torch, kind.dtype))
        view = (out.view(torch.int16) if kind.dtype == "bfloat16" else out).numpy()
    else:
        out = view = np.empty((T, H), kind.dtype)
    nat.weighted_sum(table, pos64, w32, view, H, _NATIVE_CODES[kind.dtype], src)
    return out


def _accumulate_in_order(acc: np.ndarray, g: np.ndarray, w: np.ndarray) -> None:
    """acc = 0, then + w[:, k] * g[:, k] for each k in order (0 + ...: -0.0 sums to +0.0, as
    in a layer that starts from zeros)."""
    acc[...] = 0
    term = np.empty(acc.shape, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN as torch gives them
        for k in range(g.shape[1]):
            np.multiply(w[:, k, None], g[:, k], out=term)
            acc += term
