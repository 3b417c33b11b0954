"""numpy and CPU torch tensors as raw rows, and back, without copies.

The fabric moves token rows as bytes, so every dtype (bfloat16 included, which numpy lacks)
travels the same way: a torch bfloat16 tensor is seen through its int16 view.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

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


def weighted_sum(table: np.ndarray, pos: np.ndarray, weights: np.ndarray, kind: Kind) -> Any:
    """sum over k of ``weights[:, k] * table[pos[:, k]]``, in k order, accumulated in float32.

    ``table`` is [R, H] in the element dtype (bfloat16 as int16 bits), ``pos`` [T, K] row
    indices into it (trusted: made by ``plan_dispatch``); the result is [T, H] in the caller's
    type and dtype. One multiply, then one add, per slot in k order (no fused multiply-add),
    makes float32 results equal to a reference layer that accumulates its experts' outputs the
    same way. Rows are gathered a few tokens at a time into a small scratch buffer.
    """
    T, K = pos.shape
    H = table.shape[1]
    w32 = np.ascontiguousarray(weights, dtype=np.float32)
    chunk = max(1, (4 << 20) // max(1, K * H * table.itemsize))
    scratch = np.empty((min(chunk, max(T, 1)), K, H), table.dtype)
    acc = np.empty((T, H), np.float32)
    torch = _torch() if kind.torch else None
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        g = np.take(table, pos[t0:t1], axis=0, out=scratch[:t1 - t0], mode="clip")
        if torch is not None:
            _accumulate_torch(torch, torch.from_numpy(acc[t0:t1]), wrap(g, kind),
                              torch.from_numpy(w32[t0:t1]))
        else:
            _accumulate_numpy(acc[t0:t1], g, w32[t0:t1])
    if torch is not None:
        out = torch.from_numpy(acc)
        return out if kind.dtype == "float32" else out.to(getattr(torch, kind.dtype))
    return acc if kind.dtype == "float32" else acc.astype(kind.dtype)


def _accumulate_torch(torch: Any, acc: Any, g: Any, w: Any) -> None:
    for k in range(g.shape[1]):
        # float32 slots are views of the scratch buffer, scaled in place; others converted
        term = g[:, k].float().mul_(w[:, k, None])
        if k:
            acc.add_(term)
        else:
            acc.copy_(term)


def _accumulate_numpy(acc: np.ndarray, g: np.ndarray, w: np.ndarray) -> None:
    term = np.empty(acc.shape, np.float32)
    for k in range(g.shape[1]):
        np.multiply(w[:, k, None], g[:, k], out=term, casting="unsafe")
        if k:
            acc += term
        else:
            acc[...] = term
