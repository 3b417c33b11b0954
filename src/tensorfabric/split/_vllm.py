"""The cloud tier's generation engine on vLLM: one in-process ``AsyncLLM`` shared by every request.

vLLM batches whatever is in flight continuously (a new request joins the running batch at the
next step), keeps the KV cache in pages and reuses cached prompt prefixes. The cloud tier drives
it from its worker threads: :meth:`VllmChat.stream` submits a request to the engine's event loop
(a thread of its own) and yields its tokens as vLLM produces them, so as many requests as the
tier admits run in one batch.

Chat prompts are encoded here with the model folder's own chat template (the one ``vllm serve``
applies), and handed to vLLM as token ids; the answer text is vLLM's own detokenization, so a
greedy answer equals plain ``vllm serve``'s for the same prompt and settings.

Needs the ``vllm`` extra (``pip install 'tensorfabric[vllm]'``); imported only when a tier
runs on vLLM.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..vllm._launch import IN_PROCESS_WORKER
from ._lm import encode_chat

__all__ = ["VllmChat", "VllmHttpChat", "VllmStep", "have_vllm"]

_HINT = "the cloud tier on vLLM needs the vllm extra: pip install 'tensorfabric[vllm]'"


def have_vllm() -> bool:
    """Whether vLLM is installed (found, not imported: importing it costs seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class VllmStep:
    """What one engine step added to a request: new token ids, their text and log-probabilities
    (natural log; empty unless asked for), and the finish reason on the last step."""

    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class _Stats:
    """Engine statistics as vLLM reports them each step (a vLLM stat logger)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.prefix_hits = 0
        self.prefix_queries = 0
        self.generation_tokens = 0
        self.prompt_tokens = 0

    def factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any,
                       mm_cache_stats: Any = None, engine_idx: int = 0) -> None:  # fmt: skip
                if scheduler_stats is not None:
                    stats.running = int(scheduler_stats.num_running_reqs)
                    stats.waiting = int(scheduler_stats.num_waiting_reqs)
                    stats.kv_usage = float(scheduler_stats.kv_cache_usage)
                    pc = getattr(scheduler_stats, "prefix_cache_stats", None)
                    if pc is not None:
                        stats.prefix_hits += int(getattr(pc, "hits", 0))
                        stats.prefix_queries += int(getattr(pc, "queries", 0))
                if iteration_stats is not None:
                    stats.generation_tokens += int(getattr(iteration_stats, "num_generation_tokens", 0))
                    stats.prompt_tokens += int(getattr(iteration_stats, "num_prompt_tokens", 0))

            def log_engine_initialized(self) -> None:
                pass

        return _Logger

    def snapshot(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "kv_usage": self.kv_usage,
                "generation_tokens": self.generation_tokens, "prompt_tokens": self.prompt_tokens,
                "prefix_cache_hits": self.prefix_hits, "prefix_cache_queries": self.prefix_queries}


class _Template:
    """Chat-template encoding with the model folder's tokenizer (what ``vllm serve`` applies)."""

    tokenizer: Any

    def encode_chat(self, messages: Sequence[dict[str, str]], prefix: str = "") -> list[int]:
        """Token ids of the chat prompt with the generation prompt, plus an optional answer
        prefix to continue from."""
        return encode_chat(self.tokenizer, messages, prefix)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def warmup(self) -> None:
        for _ in self.stream(self.encode_chat([{"role": "user", "content": "Hi"}]), max_tokens=2):  # type: ignore[attr-defined]
            pass


class VllmChat(_Template):
    """A chat model served by vLLM's async engine in this process.

    ``model``: ``"default"``, a .gguf file (converted once to the float32 folder vLLM loads) or
    a Hugging Face folder. ``kv_space_gib``: the KV cache (``VLLM_CPU_KVCACHE_SPACE`` on CPU).
    ``max_num_seqs``: requests vLLM runs in one batch. ``start_timeout``: seconds the engine may
    take to start.
    """

    def __init__(self, model: str = "default", *, kv_space_gib: int = 1, max_model_len: int = 2048,
                 max_num_seqs: int = 64, dtype: str = "float32", start_timeout: float = 900.0,
                 enable_prefix_caching: bool = True, cpus: str | None = None) -> None:  # fmt: skip
        if not have_vllm():
            raise ImportError(_HINT)
        from ..vllm._model import hf_folder

        # vLLM CPU reads its KV size and its worker's CPUs from the environment when the
        # engine starts (its processes inherit it); set for that moment only, so that another
        # tier started later from this process (a respawned cloud) does not inherit them.
        # The model worker runs inside the engine-core process (not a third process that
        # imports vLLM and torch again: ~20 s of CPU per start; bench/vllm_start.py).
        env = {"VLLM_CPU_KVCACHE_SPACE": str(int(kv_space_gib)), **IN_PROCESS_WORKER}
        if cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        folder = hf_folder(None if model == "default" else model)
        from transformers import AutoTokenizer

        self.folder = str(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.name = f"{os.path.basename(self.folder.rstrip('/'))}-vllm"
        self.max_model_len = int(max_model_len)
        self.stats = _Stats()
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tf-vllm-loop", daemon=True)
        self._thread.start()
        args = dict(model=self.folder, dtype=dtype, enforce_eager=True, max_model_len=self.max_model_len,
                    max_num_seqs=int(max_num_seqs), enable_prefix_caching=enable_prefix_caching,
                    disable_log_stats=False)  # fmt: skip
        added = {k: v for k, v in env.items() if k not in os.environ}  # the user's settings win
        os.environ.update(added)
        fut = asyncio.run_coroutine_threadsafe(self._start(args), self._loop)
        try:
            self.engine = fut.result(timeout=start_timeout)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        finally:
            for k in added:
                os.environ.pop(k, None)

    async def _start(self, args: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[self.stats.factory()])

    # ------------------------------------------------------------------ generation

    def stream(self, prompt_ids: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, logprobs: bool = False,
               timeout: float = 300.0) -> Generator[VllmStep, None, None]:  # fmt: skip
        """Generate for one request inside the shared batch; closing the iterator (or
        ``timeout`` seconds without a step) aborts the request in vLLM."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                             f"the cloud model's context of {self.max_model_len} tokens")
        params = SamplingParams(
            max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
            seed=None if seed is None else int(seed), logprobs=0 if logprobs else None,
            output_kind=RequestOutputKind.DELTA,
        )  # fmt: skip
        rid = f"tf-{next(self._ids)}"
        out: queue.Queue[Any] = queue.Queue()

        async def run() -> None:
            try:
                async for ro in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)),
                                                     params, rid):  # fmt: skip
                    c = ro.outputs[0]
                    lps: list[float] = []
                    if logprobs and c.logprobs:
                        for tok, d in zip(c.token_ids, c.logprobs):
                            lp = d.get(tok) if hasattr(d, "get") else None
                            lps.append(float(lp.logprob) if lp is not None else 0.0)
                    out.put(VllmStep(list(c.token_ids), c.text, lps, c.finish_reason if ro.finished else None))
            except BaseException as exc:  # handed to the reader thread
                out.put(exc)
            finally:
                out.put(None)

        task = asyncio.run_coroutine_threadsafe(run(), self._loop)
        finished = False
        try:
            while True:
                try:
                    item = out.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"vLLM produced nothing for request {rid} in {timeout:.0f} s") from None
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                task.cancel()
                asyncio.run_coroutine_threadsafe(self.engine.abort(rid), self._loop)

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        self.engine = None



class VllmHttpChat(_Template):
    """The same interface over vLLM's OpenAI endpoint, streamed (used for the disaggregated
    prefill/decode pair: :class:`tensorfabric.vllm.DisaggCluster` behind its proxy)."""

    def __init__(self, url: str, folder: str, *, max_model_len: int = 2048, cluster: Any = None) -> None:
        from transformers import AutoTokenizer

        self.url = url.rstrip("/")
        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.name = f"{os.path.basename(folder.rstrip('/'))}-vllm-disagg"
        self.max_model_len = int(max_model_len)
        self.cluster = cluster
        self.stats = _Stats()
        self._lock = threading.Lock()

    @classmethod
    def disaggregated(cls, model: str = "default", *, kv_space_gib: int = 1,
                      max_model_len: int = 2048) -> VllmHttpChat:  # fmt: skip
        """Start one prefill and one decode vLLM instance joined by tensorfabric's KV connector,
        and the proxy in front of them; closing this stops them."""
        from ..vllm import DisaggCluster, hf_folder

        folder = str(hf_folder(None if model == "default" else model))
        cluster = DisaggCluster(folder, prefill=1, decode=1, kv_space_gib=int(kv_space_gib),
                                max_model_len=max_model_len).start()  # fmt: skip
        return cls(cluster.url, folder, max_model_len=max_model_len, cluster=cluster)

    def stream(self, prompt_ids: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, logprobs: bool = False,
               timeout: float = 300.0) -> Generator[VllmStep, None, None]:  # fmt: skip
        import httpx

        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                             f"the cloud model's context of {self.max_model_len} tokens")
        body: dict[str, Any] = {"model": "default", "prompt": list(prompt_ids), "max_tokens": int(max_tokens),
                                "temperature": float(temperature), "top_p": float(top_p), "stream": True,
                                "return_token_ids": True}  # fmt: skip
        if seed is not None:
            body["seed"] = int(seed)
        if logprobs:
            body["logprobs"] = 1
        with self._lock:
            self.stats.running += 1
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body,
                              timeout=httpx.Timeout(timeout, connect=10.0)) as r:  # fmt: skip
                if r.status_code != 200:
                    raise RuntimeError(f"vLLM answered {r.status_code}: {r.read()[:300]!r}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    c = json.loads(line[6:])["choices"][0]
                    toks = [int(t) for t in c.get("token_ids") or []]
                    lps = [float(x) for x in ((c.get("logprobs") or {}).get("token_logprobs") or [])]
                    with self._lock:
                        self.stats.generation_tokens += len(toks)
                    yield VllmStep(toks, c.get("text", ""), lps, c.get("finish_reason"))
        finally:
            with self._lock:
                self.stats.running -= 1

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
