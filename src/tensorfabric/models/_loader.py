"""Load checkpoints with transformers, once per process, with a disk cache for GGUF.

Loading a GGUF file dequantizes every tensor (about 20 s for the 135M default model on a busy
2-core machine, plus about 5 s to convert its tokenizer). The first load in a process writes
the dequantized model as a Hugging Face folder (safetensors) under the cache directory; later
loads, in any process, read that folder instead (about 1-3 s). The cache key covers the GGUF
file's path, size and modification time, the dtype and the transformers version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ModelLoadError
from ._source import ModelSource, resolve_model

_LLM_HINT = "tensorfabric.models needs torch and transformers: pip install 'tensorfabric[llm]'"


def _require_llm() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(_LLM_HINT) from exc
    return torch, transformers


@dataclass
class LoadedModel:
    """A model ready to run: ``model`` (eval mode), ``tokenizer``, ``config``.

    ``load_seconds`` is the wall time this process spent loading it, ``from_disk_cache`` says
    whether a dequantized copy was read instead of the GGUF file.
    """

    model: Any
    tokenizer: Any
    config: Any
    source: ModelSource
    dtype: Any
    load_seconds: float = 0.0
    from_disk_cache: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """``$TENSORFABRIC_CACHE_DIR/models`` if set, else ``~/.cache/tensorfabric/models``."""
    root = os.environ.get("TENSORFABRIC_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "tensorfabric"
    return base / "models"


def load_model(
    path_or_name: str | Path | None = None,
    *,
    dtype: Any = None,
    cache: bool = True,
    disk_cache: bool = True,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; the same arguments return the same object.

    ``path_or_name``: ``None`` (the default SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a
    ``.safetensors`` file with ``config.json`` beside it, or a Hugging Face model folder. Any
    Llama-style architecture transformers knows works. ``dtype`` defaults to ``torch.float32``.
    ``cache=False`` skips the per-process cache; ``disk_cache=False`` always reads the GGUF.

    Raises :class:`ModelNotFoundError` for a bad path and :class:`ModelLoadError` when
    transformers cannot read the checkpoint.
    """
    torch, _ = _require_llm()
    dtype = _as_dtype(torch, dtype)
    source = resolve_model(path_or_name)
    key = (str(source.path), source.kind, str(dtype))
    if cache:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            return hit
    started = time.perf_counter()
    model, tokenizer, from_disk = _load(source, dtype, disk_cache, cache_dir)
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        source=source,
        dtype=dtype,
        load_seconds=time.perf_counter() - started,
        from_disk_cache=from_disk,
        stop_token_ids=_stop_ids(model, tokenizer),
    )
    if cache:
        with _CACHE_LOCK:
            loaded = _CACHE.setdefault(key, loaded)
    return loaded


def clear_model_cache() -> None:
    """Forget every model this process loaded (the disk cache stays)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _as_dtype(torch: Any, dtype: Any) -> Any:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        return value
    return dtype


def _load(
    source: ModelSource, dtype: Any, disk_cache: bool, cache_dir: str | Path | None
) -> tuple[Any, Any, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if source.kind == "gguf":
            return _load_gguf(source, dtype, disk_cache, cache_dir)
        if source.kind == "folder":
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
            return model, AutoTokenizer.from_pretrained(source.path), False
        return _load_safetensors_file(source, dtype), AutoTokenizer.from_pretrained(
            source.folder
        ), False
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"transformers could not load {source.kind} checkpoint {source.path}: {exc}. "
            "Check that it is a causal LM transformers supports (Llama-style) and that the "
            "tokenizer files are in the same folder.",
            path=str(source.path),
        ) from exc


def _load_gguf(
    source: ModelSource, dtype: Any, disk_cache: bool, cache_dir: str | Path | None
) -> tuple[Any, Any, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_path(source.path, dtype, cache_dir) if disk_cache else None
    if cached is not None and (cached / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            return model, AutoTokenizer.from_pretrained(cached), True
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # a damaged cache entry: fall back to the GGUF file and rewrite it
    folder, name = source.path.parent, source.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # After dequantization the weights are plain tensors; drop the GGUF marker so the model
    # behaves (and serializes) like any other checkpoint.
    setattr(model, "hf_quantizer", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if cached is not None:
        _write_cache(model, tokenizer, cached)
    return model, tokenizer, False


_CACHE_FORMAT = 2


def _gguf_cache_path(path: Path, dtype: Any, cache_dir: str | Path | None) -> Path:
    import transformers

    stat = path.stat()
    # bump _CACHE_FORMAT whenever what is written changes: entries of older code are not reused
    ident = (f"{_CACHE_FORMAT}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|"
             f"{transformers.__version__}")
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{path.stem}-{str(dtype).removeprefix('torch.')}-{digest}"


def _write_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Write atomically: save into a temporary sibling, then rename (first writer wins)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError:
        return  # an unwritable cache only costs speed
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        pass  # another process won the race, or the disk is full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_safetensors_file(source: ModelSource, dtype: Any) -> Any:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_file(str(source.path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if getattr(config, "tie_word_embeddings", False):
        tied |= {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(
            f"{source.path} does not match {config.model_type} from config.json: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}",
            path=str(source.path),
        )
    model.tie_weights()
    return model.to(dtype)


def _stop_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)
