"""Dtypes of weight tensors and the conversions done on the sending side.

numpy has no bfloat16, so a bf16 tensor is stored as ``uint16`` bit patterns (the same bits torch
uses). Conversions round to nearest even, bit-identical to ``torch.Tensor.to(torch.bfloat16)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorfabric.weights._errors import LayoutError

#: dtype name -> numpy storage dtype (bf16 travels as its uint16 bit pattern)
STORAGE: dict[str, np.dtype[Any]] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
FLOATS = ("float64", "float32", "float16", "bfloat16")


def check_dtype(name: str) -> str:
    if name not in STORAGE:
        raise LayoutError(
            f"unsupported dtype {name!r}; use one of {', '.join(STORAGE)}"
        )
    return name


def itemsize(name: str) -> int:
    return STORAGE[check_dtype(name)].itemsize


def can_convert(src: str, dst: str) -> bool:
    return src == dst or (src in FLOATS and dst in FLOATS)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bf16 bit patterns, round to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN, sign kept
    return out


def bf16_bits_to_f32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def convert_into(out: np.ndarray, src: np.ndarray, src_dtype: str, dst_dtype: str) -> None:
    """Write ``src`` (storage of ``src_dtype``) converted to ``dst_dtype`` into ``out``.

    ``out`` and ``src`` have the same shape; ``out`` may be a strided view.
    """
    if src_dtype == dst_dtype:
        np.copyto(out, src, casting="no")
        return
    torch = _torch()
    if torch is not None and "bfloat16" in (src_dtype, dst_dtype):
        _torch_view(torch, out, dst_dtype).copy_(_torch_view(torch, src, src_dtype))
        return
    if dst_dtype == "bfloat16":
        values = src if src_dtype != "bfloat16" else bf16_bits_to_f32(src)
        np.copyto(out, f32_to_bf16_bits(values.astype(np.float32, copy=False)))
        return
    if src_dtype == "bfloat16":
        np.copyto(out, bf16_bits_to_f32(src), casting="unsafe")
        return
    np.copyto(out, src, casting="unsafe")


_TORCH: list[Any] = []


def _torch() -> Any:
    """torch if it can be imported (its bf16 cast is ~20x faster than the numpy fallback)."""
    if not _TORCH:
        torch: Any
        try:
            import torch
        except ImportError:
            torch = None
        _TORCH.append(torch)
    return _TORCH[0]


def _torch_view(torch: Any, arr: np.ndarray, dtype: str) -> Any:
    t = torch.from_numpy(arr) if arr.ndim else torch.from_numpy(arr.reshape(1))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def as_storage(value: Any) -> tuple[np.ndarray, str]:
    """A numpy array or CPU torch tensor -> (numpy storage view, dtype name). No copy when possible."""
    if isinstance(value, np.ndarray):
        name = str(value.dtype)
        if name not in STORAGE or name == "uint16":
            raise LayoutError(f"unsupported numpy dtype {value.dtype} for a weight tensor")
        return value, name
    module = type(value).__module__
    if module.startswith("torch"):
        import torch

        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        name = str(t.dtype).removeprefix("torch.")
        if name == "bfloat16":
            return t.view(torch.int16).numpy().view(np.uint16), name
        check_dtype(name)
        return t.numpy(), name
    raise LayoutError(
        f"weights must be numpy arrays or torch tensors, got {type(value).__name__}"
    )
