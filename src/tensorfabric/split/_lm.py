"""Chat models for the tiers: chat-template encoding, token streaming with log-probabilities.

Loading goes through :func:`tensorfabric.models.load_model` (GGUF/safetensors/HF folders, disk
cache). The edge copy may be int8 dynamically quantized (``torch.ao.quantization``: Linear
weights in int8, activations quantized on the fly), which roughly quarters the Linear weights'
memory and keeps the model on CPU.

A :class:`ChatModel` runs one generation at a time (``lock``); torch already uses every core for
one sequence on CPU, so interleaving requests would only add cache thrash.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import Overloaded

__all__ = ["ChatModel", "TokenStep", "load_chat_model"]

_LLM_HINT = "edge/cloud serving needs torch and transformers: pip install 'tensorfabric[llm]'"


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(_LLM_HINT) from exc
    return torch


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], prefix: str = "") -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template with the generation
    prompt, plus an optional answer ``prefix`` to continue from."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # BatchEncoding in transformers 5
        ids = ids["input_ids"]
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    if prefix:
        ids += tokenizer.encode(prefix, add_special_tokens=False)
    return [int(i) for i in ids]


@dataclass(frozen=True)
class TokenStep:
    token_id: int
    logprob: float
    text: str  # the new text this token completes (may be "" mid-way through a UTF-8 char)
    stop: bool  # a stop token: nothing more follows


class ChatModel:
    """A loaded causal LM with its tokenizer, ready for chat generation."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, stop_ids: Sequence[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.lock = threading.Lock()
        self.config = model.config
        self.waiting = 0  # requests queued for the model (``acquire`` not yet returned)
        self._waiting_lock = threading.Lock()

    def warmup(self) -> None:
        """Run two tokens once: the first forward in a process pays for page faults and lazy
        kernel setup (seconds on a busy machine), which should not land on a user request."""
        with self.lock:
            for _ in self.stream(self.encode_chat([{"role": "user", "content": "Hi"}]), max_new_tokens=2):
                pass

    # ------------------------------------------------------------------ tokens

    def encode_chat(self, messages: Sequence[dict[str, str]], prefix: str = "") -> list[int]:
        """Token ids of the chat prompt (with the generation prompt), plus an optional answer
        prefix to continue from (used when the edge takes over a half-finished cloud answer)."""
        return encode_chat(self.tokenizer, messages, prefix)

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return len(self.encode_chat(messages))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # ------------------------------------------------------------------ generation

    def acquire(self, timeout: float) -> None:
        """Take the model for one generation; :class:`Overloaded` if it stays busy too long."""
        with self._waiting_lock:
            self.waiting += 1
        try:
            got = self.lock.acquire(timeout=timeout)
        finally:
            with self._waiting_lock:
                self.waiting -= 1
        if not got:
            raise Overloaded(
                f"model {self.name!r} stayed busy for {timeout:.0f} s; retry later or raise "
                "server.request_timeout"
            )

    def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Generator[TokenStep, None, None]:
        """Generate token by token (greedy when ``temperature`` is 0). Caller holds ``lock``."""
        torch = _torch()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        detok = _Detokenizer(self)
        from transformers import DynamicCache

        with torch.inference_mode():
            past = DynamicCache(config=self.config)  # filled in place by every forward
            inp = torch.tensor([list(prompt_ids)], dtype=torch.long)
            for _ in range(max_new_tokens):
                out = self.model(input_ids=inp, past_key_values=past, use_cache=True)
                logits = out.logits[0, -1].float()
                tok, lp = _pick(torch, logits, temperature, top_p, gen)
                stop = tok in self.stop_ids
                yield TokenStep(tok, lp, "" if stop else detok.push(tok), stop)
                if stop:
                    return
                inp = torch.tensor([[tok]], dtype=torch.long)


def _pick(torch: Any, logits: Any, temperature: float, top_p: float, gen: Any) -> tuple[int, float]:
    logp = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        tok = int(torch.argmax(logits))
        return tok, float(logp[tok])
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    tok = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
    return tok, float(logp[tok])


class _Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character."""

    def __init__(self, model: ChatModel) -> None:
        self._model = model
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, tok: int) -> str:
        self._ids.append(tok)
        text = self._model.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self._emitted :]
        self._emitted = len(text)
        return new


def load_chat_model(model: str = "default", *, quantize: str = "none") -> ChatModel:
    """Load ``model`` ("default", a .gguf file, or a Hugging Face folder); ``quantize="int8"``
    returns an int8 dynamically quantized copy (the shared fp32 model is left untouched)."""
    torch = _torch()
    try:
        from tensorfabric.models import load_model
    except ImportError as exc:
        raise ImportError(_LLM_HINT) from exc
    loaded = load_model(None if model == "default" else model)
    m = loaded.model
    name = loaded.name
    if quantize == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation notice (torchao migration)
            m = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(m), {torch.nn.Linear}, dtype=torch.qint8
            )
        name += "-int8"
    m.eval()
    return ChatModel(m, loaded.tokenizer, name=name, stop_ids=loaded.stop_token_ids)
