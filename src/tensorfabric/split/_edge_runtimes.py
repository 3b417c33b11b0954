"""The edge runtime besides the int8 transformers model: vLLM (batched, float32).

Each gives the edge tier the interface of :class:`~._lm.ChatModel`: ``encode_chat``, ``acquire``
/ ``lock.release()`` around one generation, ``stream`` yielding :class:`~._lm.TokenStep` with the
token's log-probability (the router's probe), ``waiting`` and ``running`` for /metrics.

- ``vllm``: the edge's own in-process vLLM engine. ``lock`` is a semaphore of
  ``max_num_seqs`` slots, so that many requests run in one continuous batch.
docs/split.md ("Edge runtime") has the measurements behind the default.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from typing import Any

from ._errors import Overloaded
from ._lm import TokenStep

__all__ = ["VllmEdge", "load_edge_model"]


class _Slots:
    """``acquire(timeout)`` / ``lock.release()`` over ``n`` slots, counting who waits."""

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self.lock = threading.BoundedSemaphore(slots)
        self.slots = slots
        self.waiting = 0
        self.running = 0
        self._count = threading.Lock()

    def acquire(self, timeout: float) -> None:
        with self._count:
            self.waiting += 1
        try:
            got = self.lock.acquire(timeout=timeout)
        finally:
            with self._count:
                self.waiting -= 1
                self.running += int(got)
        if not got:
            raise Overloaded(f"model {self.name!r} stayed busy for {timeout:.0f} s; retry later or "
                             "raise server.request_timeout")  # fmt: skip

    def released(self) -> None:
        with self._count:
            self.running = max(self.running - 1, 0)


class _Lock:
    """A semaphore whose ``release`` also updates the running count."""

    def __init__(self, slots: _Slots) -> None:
        self._slots = slots

    def acquire(self, timeout: float = -1) -> bool:
        return self._slots.lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._slots.lock.release()
        self._slots.released()

    def locked(self) -> bool:
        return self._slots.running > 0


class VllmEdge:
    """The edge model on vLLM in this process (float32, the full model: no int8 loss)."""

    def __init__(self, model: str = "default", *, kv_space_gib: int = 1, max_num_seqs: int = 32,
                 max_model_len: int = 2048, cpus: str | None = None) -> None:  # fmt: skip
        from ._vllm import VllmChat

        self.engine = VllmChat(model, kv_space_gib=kv_space_gib, max_num_seqs=max_num_seqs,
                               max_model_len=max_model_len, cpus=cpus)  # fmt: skip
        self.name = self.engine.name
        self.tokenizer = self.engine.tokenizer
        self.stop_ids = frozenset(int(i) for i in [self.tokenizer.eos_token_id] if i is not None)
        self._slots = _Slots(self.name, max_num_seqs)
        self.lock = _Lock(self._slots)

    @property
    def waiting(self) -> int:
        return self._slots.waiting

    @property
    def slots(self) -> int:
        return self._slots.slots

    @property
    def running(self) -> int:
        return self._slots.running

    def acquire(self, timeout: float) -> None:
        self._slots.acquire(timeout)

    def encode_chat(self, messages: Sequence[dict[str, str]], prefix: str = "") -> list[int]:
        return self.engine.encode_chat(messages, prefix)

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return len(self.encode_chat(messages))

    def decode(self, ids: Sequence[int]) -> str:
        return self.engine.decode(ids)

    def warmup(self) -> None:
        self.engine.warmup()

    def stream(self, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> Generator[TokenStep, None, None]:  # fmt: skip
        steps = self.engine.stream(prompt_ids, max_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed, logprobs=True)  # fmt: skip
        try:
            for st in steps:
                n = len(st.token_ids)
                for i, tok in enumerate(st.token_ids):
                    stop = tok in self.stop_ids
                    lp = st.logprobs[i] if i < len(st.logprobs) else 0.0
                    # the step's text belongs to its last token (vLLM detokenizes per step)
                    yield TokenStep(tok, lp, "" if stop or i < n - 1 else st.text, stop)
                    if stop:
                        return
        finally:
            steps.close()

    def close(self) -> None:
        self.engine.close()


def load_edge_model(cfg: Any) -> Any:
    """The edge model for ``edge.runtime`` (``transformers`` int8 / none, or ``vllm``)."""
    e = cfg.edge
    runtime = e.runtime
    if runtime == "vllm":
        return VllmEdge(e.model, kv_space_gib=e.kv_space_gib, max_num_seqs=e.max_num_seqs,
                        max_model_len=e.max_context, cpus=e.cpus)  # fmt: skip
    from ._lm import load_chat_model

    return load_chat_model(e.model, quantize=e.quantize)
