"""Chat templating and a plain greedy decoder that accepts any transformers ``Cache``.

The decoder is split into :func:`prefill` and :func:`decode` so that a disaggregated system
can run the first on one worker and the second on another, with the KV cache moved between
them; :func:`generate` runs both in one process and is the reference they must match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._loader import LoadedModel

Messages = Sequence[dict[str, str]]


def chat_ids(
    loaded: LoadedModel, prompt: str | Messages, *, system: str | None = None
) -> list[int]:
    """Token ids of ``prompt`` (a user message, or a list of chat messages) formatted with the
    tokenizer's chat template, ending with the assistant generation prompt.

    Models without a chat template get the plain encoded text.
    """
    tokenizer = loaded.tokenizer
    if isinstance(prompt, str):
        messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])


@dataclass
class Generation:
    """Result of a greedy run: the new token ids, their text, and timings in seconds."""

    prompt_tokens: int
    tokens: list[int]
    text: str
    ttft_s: float
    total_s: float
    stopped: bool  # True when a stop token ended the run (it is not in ``tokens``)


def prefill(loaded: LoadedModel, input_ids: Sequence[int], cache: Any) -> int:
    """Run the prompt through the model into ``cache``; return the first generated token."""
    torch = _torch()
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    with torch.inference_mode():
        out = loaded.model(input_ids=ids, past_key_values=cache, use_cache=True)
    return int(out.logits[0, -1].argmax())


def decode(
    loaded: LoadedModel,
    first_token: int,
    cache: Any,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[int], bool]:
    """Greedy-decode from a cache that already holds the prompt.

    ``first_token`` (the prefill's output) counts towards ``max_new_tokens``. Returns the
    generated tokens (stop token excluded) and whether a stop token ended the run.
    """
    torch = _torch()
    stops = set(loaded.stop_token_ids if stop_token_ids is None else stop_token_ids)
    tokens: list[int] = []
    token = first_token
    with torch.inference_mode():
        while True:
            if token in stops:
                return tokens, True
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(tokens) >= max_new_tokens:
                return tokens, False
            ids = torch.tensor([[token]], dtype=torch.long)
            out = loaded.model(input_ids=ids, past_key_values=cache, use_cache=True)
            token = int(out.logits[0, -1].argmax())


def generate(
    loaded: LoadedModel,
    prompt: str | Messages | Sequence[int],
    *,
    max_new_tokens: int = 64,
    cache: Any = None,
    stop_token_ids: Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Greedy generation in this process (the single-process reference).

    ``prompt`` is text or chat messages (formatted with :func:`chat_ids`) or token ids.
    ``cache`` defaults to a fresh ``transformers.DynamicCache``. ``on_token(token)`` runs as
    each token is chosen (feed a :class:`TextStream` to print text as it comes).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    ids = _as_ids(loaded, prompt)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=loaded.config)
    started = time.perf_counter()
    first = prefill(loaded, ids, cache)
    ttft = time.perf_counter() - started
    tokens, stopped = decode(
        loaded, first, cache, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
        on_token=on_token,
    )
    text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(len(ids), tokens, text, ttft, time.perf_counter() - started, stopped)


class TextStream:
    """Turns tokens into text as they come: :meth:`push` returns the new text a token adds.

    Text is decoded from the whole answer so far, so pieces that only make sense together
    (a multi-byte character split across tokens, a word joined to the previous one) come out
    right; a piece that ends in an incomplete character is held back until it completes. The
    pieces joined equal ``tokenizer.decode(tokens, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # wait for the rest of the character (or a re-spelling) to settle
        piece, self.text = text[len(self.text):], text
        return piece

    def flush(self) -> str:
        """Whatever :meth:`push` held back (call once the answer is complete)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return piece


def _as_ids(loaded: LoadedModel, prompt: str | Messages | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return chat_ids(loaded, prompt)
    items = list(prompt)
    if items and isinstance(items[0], dict):
        return chat_ids(loaded, items)  # type: ignore[arg-type]
    return [int(t) for t in items]  # type: ignore[call-overload]


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError("pip install 'tensorfabric[llm]'") from exc
    return torch
