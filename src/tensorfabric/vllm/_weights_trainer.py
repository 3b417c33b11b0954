"""A stand-in trainer for weight-update drills: the default model's tensors, a deterministic
"training step", and a Hugging Face folder of any version (what a fresh vLLM loads)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"


def trainer_tensors(folder: str | Path) -> dict[str, Any]:
    """The float32 tensors of the Hugging Face folder ``folder`` (one ``model.safetensors``),
    by checkpoint name, as a trainer holds them (contiguous CPU torch tensors)."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        from .._errors import ConfigError

        raise ConfigError(f"{folder} has no {WEIGHTS_FILE}; use a folder hf_folder() made")
    return {k: v.contiguous() for k, v in sorted(load_file(str(path)).items())}


def perturb(tensors: dict[str, Any], step: int, scale: float = 0.05) -> dict[str, Any]:
    """A fake training step, deterministic in ``step``: adds ``scale`` times each tensor's
    standard deviation times seeded Gaussian noise, in place (same results on every machine
    with the same torch). Returns ``tensors``."""
    import torch

    for i, name in enumerate(sorted(tensors)):
        t = tensors[name]
        g = torch.Generator().manual_seed(step * 1_000_003 + i)
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        std = float(t.float().std()) if t.numel() > 1 else 1.0
        t.add_((noise * (scale * std)).to(t.dtype))
    return tensors


def save_folder(src: str | Path, tensors: dict[str, Any], dst: str | Path) -> Path:
    """A copy of the Hugging Face folder ``src`` whose weights are ``tensors`` (so a fresh vLLM
    started on it serves exactly that version)."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != WEIGHTS_FILE:
            shutil.copy2(f, dst / f.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / WEIGHTS_FILE),
              metadata={"format": "pt"})
    return dst
