"""The Hugging Face folder vLLM loads for a tensorfabric model name or path."""

from __future__ import annotations

from pathlib import Path


def hf_folder(model: str | Path | None = None) -> Path:
    """A folder vLLM can load: a Hugging Face folder as it is, and for a GGUF file (the
    default model included) the float32 folder tensorfabric's model cache writes from it
    (``~/.cache/tensorfabric/models``; written by loading the model once if missing)."""
    import torch

    from ..models import load_model, resolve_model
    from ..models._loader import _gguf_cache_path

    source = resolve_model(model)
    if source.path.is_dir():
        return source.path
    if source.path.suffix != ".gguf":
        return source.path.parent
    folder = _gguf_cache_path(source.path, torch.float32, None)
    if not (folder / "config.json").is_file():
        load_model(source.path, dtype=torch.float32, cache=False)
    return folder
