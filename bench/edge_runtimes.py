"""Measure the edge runtimes side by side, in one run: speed and agreement with the cloud.

Runtimes (each the default model, greedy, the chat template the cloud applies):
  transformers  the ``transformers`` edge runtime, float32 (``edge.quantize: none``, the default)
  vllm          the ``vllm`` edge runtime (in-process vLLM, float32): the cloud tier's engine, so
                its answers are the reference ("the cloud's answer")
  llamacpp      llama.cpp through ``llama-cpp-python`` on the shipped GGUF Q4_1 file (the model's
                own quantized weights; ``n_threads`` = this process's CPUs), greedy by argmax over
                the logits of each step (the log-probability of the chosen token for the router)

Per runtime: load time, tokens/s of one stream (4 prompts one after the other), tokens/s with
``--concurrency`` streams at once (each through the runtime's own admission: a lock, or vLLM's
batch), and on the shipped 76-prompt routing set how often its answer equals the vLLM answer.

    PYTHONPATH=src python bench/edge_runtimes.py [--runtimes transformers,vllm,llamacpp]

Needs ``llama-cpp-python`` for the llamacpp runtime (PyPI ships it as source only: it builds
llama.cpp with CMake on install; see docs/split.md "Edge runtime").
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Generator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_calibrate import answer  # noqa: E402


class LlamaCppEdge:
    """The edge interface (``encode_chat``, ``acquire``/``lock``, ``stream`` of TokenSteps) over
    llama-cpp-python: one sequence at a time (its high-level API does not batch requests)."""

    def __init__(self, n_ctx: int = 2048) -> None:
        import numpy as np
        from llama_cpp import Llama
        from transformers import AutoTokenizer

        from tensorfabric.models._source import default_model_path
        from tensorfabric.vllm._model import hf_folder

        self.np = np
        self.gguf = str(default_model_path())
        self.llm = Llama(model_path=self.gguf, n_ctx=n_ctx, n_threads=len(os.sched_getaffinity(0)),
                         n_batch=512, logits_all=False, verbose=False)  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(str(hf_folder()))
        self.stop_ids = {int(self.tokenizer.eos_token_id), int(self.llm.token_eos())}
        self.name = f"{os.path.basename(self.gguf)}-llama.cpp"
        self.lock = threading.Lock()
        self.waiting = 0

    def acquire(self, timeout: float) -> None:
        if not self.lock.acquire(timeout=timeout):
            raise TimeoutError("llama.cpp edge busy")

    def encode_chat(self, messages: Sequence[dict[str, str]], prefix: str = "") -> list[int]:
        from tensorfabric.split._lm import encode_chat

        return encode_chat(self.tokenizer, messages, prefix)

    def warmup(self) -> None:
        for _ in self.stream(self.encode_chat([{"role": "user", "content": "Hi"}]), max_new_tokens=2):
            pass

    def stream(self, prompt_ids: Sequence[int], *, max_new_tokens: int, **_: Any) -> Generator[Any, None, None]:
        from tensorfabric.split._lm import TokenStep

        np, llm = self.np, self.llm
        n_vocab = llm.n_vocab()
        llm.reset()
        llm.eval(list(prompt_ids))
        ids: list[int] = []
        shown = ""
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).astype(np.float64)
            tok = int(logits.argmax())
            m = logits.max()
            lp = float(logits[tok] - (m + np.log(np.exp(logits - m).sum())))
            if tok in self.stop_ids:
                yield TokenStep(tok, lp, "", True)
                return
            ids.append(tok)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            piece, shown = (text[len(shown):], text) if not text.endswith("\ufffd") else ("", shown)
            yield TokenStep(tok, lp, piece, False)
            llm.eval([tok])


def load(runtime: str) -> Any:
    if runtime == "llamacpp":
        return LlamaCppEdge()
    from tensorfabric.split import parse_config
    from tensorfabric.split._edge_runtimes import load_edge_model

    cfg = parse_config({"edge": {"runtime": runtime, "quantize": "none"}, "cloud": {"engine": "transformers"}})
    return load_edge_model(cfg)


def measure(runtime: str, rows: list[dict[str, Any]], max_tokens: int, concurrency: int) -> dict[str, Any]:
    t = time.perf_counter()
    edge = load(runtime)
    edge.warmup()
    load_s = time.perf_counter() - t
    print(f"{runtime}: {edge.name} loaded in {load_s:.1f} s", file=sys.stderr, flush=True)
    t = time.perf_counter()
    toks = sum(answer(edge, r["prompt"], max_tokens)[2] for r in rows[:4])
    single = toks / (time.perf_counter() - t)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(lambda r: answer(edge, r["prompt"], max_tokens), rows[: 2 * concurrency]))
    multi = sum(o[2] for o in outs) / (time.perf_counter() - t)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:  # the whole set, as the runtime admits it
        answers = list(pool.map(lambda r: answer(edge, r["prompt"], max_tokens), rows))
    whole = time.perf_counter() - t
    close = getattr(edge, "close", None)
    if close is not None:
        close()
    return {"name": edge.name, "load_s": load_s, "single": single, "multi": multi, "whole_s": whole,
            "answers": answers}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtimes", default="vllm,transformers,llamacpp")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (a quick try)")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    runtimes = args.runtimes.split(",")
    data = resources.files("tensorfabric.split").joinpath("data/routing_prompts.json").read_text()
    rows = json.loads(data)["prompts"]
    rows = rows[: args.limit] if args.limit else rows
    load0 = os.getloadavg()[0]
    res = {rt: measure(rt, rows, args.max_tokens, args.concurrency) for rt in runtimes}
    # the reference: vLLM's answers (the cloud tier's engine), else the float32 transformers
    # model's (the same weights; equal to vLLM's on 76/76 prompts, docs/split.md)
    ref_name = "vllm" if "vllm" in res else "transformers"
    ref = res.get(ref_name)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"\n# edge_runtimes: {len(rows)} prompts, max_tokens={args.max_tokens}, greedy; "
          f"{now:%Y-%m-%d %H:%M} UTC, {platform.node()}, {len(os.sched_getaffinity(0))} CPUs, "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(f"| runtime | model | load s | tok/s one stream | tok/s {args.concurrency} streams | "
          f"{len(rows)} prompts, s | answer == {ref_name} (cloud) answer |")
    print("|---|---|---|---|---|---|---|")
    for rt, r in res.items():
        same = "-" if ref is None else f"{sum(a[0] == b[0] for a, b in zip(r['answers'], ref['answers']))}/{len(rows)}"
        print(f"| {rt} | {r['name']} | {r['load_s']:.1f} | {r['single']:.1f} | {r['multi']:.1f} | "
              f"{r['whole_s']:.1f} | {same} |")  # fmt: skip
    if ref is not None:
        for rt, r in res.items():
            diff = [(row["prompt"], a[0], b[0])
                    for row, a, b in zip(rows, r["answers"], ref["answers"]) if a[0] != b[0]]
            for p, a, b in diff[:3]:
                print(f"  {rt} differs on {p!r}: {a!r} vs {ref_name} {b!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {**v} for k, v in res.items()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
