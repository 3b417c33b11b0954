"""The Hugging Face folder vLLM loads for a tensorfabric model name or path."""

from __future__ import annotations

from pathlib import Path


def hf_folder(model: str | Path | None = None) -> Path:
    """A folder vLLM can load: a Hugging Face folder as it is, and for a GGUF file (the
    default model included) the float32 folder tensorfabric's model cache writes from it
    (``~/.cache/tensorfabric/models``; converted once, under the cache's lock, if missing)."""
    import torch

    from ..models import model_folder

    return model_folder(model, dtype=torch.float32)
