"""Load checkpoints with transformers, once per process, with a disk cache for GGUF.

Loading a GGUF file dequantizes every tensor (about 20 s for the 135M default model on an idle
2-core machine, a minute or more on a busy one, plus a few seconds to convert its tokenizer).
The first load writes the dequantized model as a Hugging Face folder (safetensors) under the
cache directory, holding a file lock so that concurrent processes convert it once (the others
wait and read the result); later loads, in any process, read that folder (about 1-3 s). See
:mod:`._diskcache` for the entries, and ``tensorfabric models`` to list and prune them.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _diskcache
from ._diskcache import default_cache_dir  # noqa: F401 - re-exported by models/__init__
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


def _stderr(text: str) -> None:
    print(f"tensorfabric: {text}", file=sys.stderr, flush=True)


def load_model(
    path_or_name: str | Path | None = None,
    *,
    dtype: Any = None,
    cache: bool = True,
    disk_cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; the same arguments return the same object.

    ``path_or_name``: ``None`` (the default SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a
    ``.safetensors`` file with ``config.json`` beside it, or a Hugging Face model folder. Any
    Llama-style architecture transformers knows works. ``dtype`` defaults to ``torch.float32``.
    ``cache=False`` skips the per-process cache; ``disk_cache=False`` always reads the GGUF.
    ``progress(text)`` hears about slow steps (a GGUF conversion, waiting for another
    process's conversion); by default those lines go to stderr. Pass ``lambda _: None`` to
    silence them.

    Raises :class:`ModelNotFoundError` for a bad path and :class:`ModelLoadError` when
    transformers cannot read the checkpoint.
    """
    source = resolve_model(path_or_name)
    say = progress if progress is not None else _stderr
    if disk_cache and source.kind == "gguf":  # said before the (slow) torch import
        _announce_conversion(source, dtype, cache_dir, say)
    torch, _ = _require_llm()
    dtype = _as_dtype(torch, dtype)
    key = (str(source.path), source.kind, str(dtype))
    if cache:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            return hit
    started = time.perf_counter()
    model, tokenizer, from_disk = _load(source, dtype, disk_cache, cache_dir, say)
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


def model_folder(
    path_or_name: str | Path | None = None,
    *,
    dtype: Any = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """A Hugging Face folder holding the model, for engines that load folders (vLLM).

    A folder is returned as it is, a ``.safetensors`` file as the folder around it; a GGUF file
    (the default model included) as the disk-cache entry of its conversion to ``dtype``
    (default ``torch.float32``), converted once under the cache's lock if it is not there yet.
    """
    source = resolve_model(path_or_name)
    if source.path.is_dir():
        return source.path
    if source.kind != "gguf":
        return source.path.parent
    torch, _ = _require_llm()
    dtype = _as_dtype(torch, dtype)
    entry = _diskcache.entry_path(source.path, str(dtype).removeprefix("torch."), cache_dir)
    if not (entry / "config.json").is_file():
        load_model(source.path, dtype=dtype, cache=False, cache_dir=cache_dir, progress=progress)
    return entry


def _announce_conversion(source: ModelSource, dtype: Any, cache_dir: str | Path | None,
                         say: Callable[[str], None]) -> None:
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    try:
        entry = _diskcache.entry_path(source.path, name, cache_dir)
    except OSError:
        return
    if not (entry / "config.json").is_file():
        say(f"{source.path.name} has no converted copy in {entry.parent} yet: it is converted "
            "once, after torch and transformers load")


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
    source: ModelSource, dtype: Any, disk_cache: bool, cache_dir: str | Path | None,
    say: Callable[[str], None],
) -> tuple[Any, Any, bool]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if source.kind == "gguf":
            return _load_gguf(source, dtype, disk_cache, cache_dir, say)
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
    source: ModelSource, dtype: Any, disk_cache: bool, cache_dir: str | Path | None,
    say: Callable[[str], None],
) -> tuple[Any, Any, bool]:
    if not disk_cache:
        return (*_convert_gguf(source, dtype), False)
    dtype_name = str(dtype).removeprefix("torch.")
    entry = _diskcache.entry_path(source.path, dtype_name, cache_dir)
    hit = _read_entry(entry, dtype)
    if hit is not None:
        return (*hit, True)
    if not _diskcache.writable(entry.parent):  # an unwritable cache only costs speed
        say(f"the model cache {entry.parent} is not writable: converting without caching")
        return (*_convert_gguf(source, dtype, say), False)
    with _diskcache.conversion_lock(entry, say, f"{source.path.name} ({dtype_name})"):
        hit = _read_entry(entry, dtype)  # another process converted it while we waited
        if hit is not None:
            return (*hit, True)
        return (*_convert_into(source, dtype, entry, say), False)


def _read_entry(entry: Path, dtype: Any) -> tuple[Any, Any] | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (entry / "config.json").is_file():
        return None
    try:
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(entry)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None  # a damaged entry: convert again and replace it


def _convert_into(
    source: ModelSource, dtype: Any, entry: Path, say: Callable[[str], None]
) -> tuple[Any, Any]:
    import transformers

    started = time.perf_counter()
    say(f"converting {source.path.name} to {str(dtype).removeprefix('torch.')} once "
        "(dequantizing every tensor: about 20 s on an idle 2-core machine, longer when busy; "
        f"later loads read {entry.parent} in a few seconds)")
    model, tokenizer = _convert_gguf(source, dtype, say)
    seconds = time.perf_counter() - started
    stat = source.path.stat()
    manifest = {"format": _diskcache.CACHE_FORMAT, "source": str(source.path),
                "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
                "dtype": str(dtype).removeprefix("torch."), "created": time.time(),
                "convert_seconds": round(seconds, 1),
                "transformers": transformers.__version__}

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    if _diskcache.write_entry(entry, save, manifest):
        removed = _diskcache.remove_older_entries(entry)
        note = f"; removed {len(removed)} older cache entr{'y' if len(removed) == 1 else 'ies'}" \
            if removed else ""
        say(f"converted in {seconds:.0f} s, cached as {entry}{note}")
    else:
        say(f"converted in {seconds:.0f} s (the cache {entry.parent} is not writable)")
    return model, tokenizer


def _convert_gguf(
    source: ModelSource, dtype: Any, say: Callable[[str], None] | None = None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = source.path.parent, source.path.name
    if say is not None:
        say("reading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if say is not None:
        say("reading and dequantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # After dequantization the weights are plain tensors; drop the GGUF marker so the model
    # behaves (and serializes) like any other checkpoint.
    setattr(model, "hf_quantizer", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


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
