"""``tensorfabric serve`` with its cloud tier on vLLM: the openai client (plain, streaming, 50
concurrent clients), and the cloud tier's greedy answers against plain ``vllm serve``'s.

One served stack for the module (cloud tier on vLLM; the edge on the int8 transformers
model, so the module runs two vLLM instances with the session's plain reference)."""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helpers.vllm import post, subprocess_env

openai = pytest.importorskip("openai")
yaml = pytest.importorskip("yaml")

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three primary colours.",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tensorfabric.serve import ServerProcess

    d = tmp_path_factory.mktemp("serve-vllm")
    cfg = {
        "server": {"port": 0, "request_timeout": 600},
        "cloud": {"engine": "vllm", "kv_space_gib": 1, "max_num_seqs": 64},
        "routing": {"policy": "confidence"},
    }
    path = Path(d) / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the reference server binds CPU 0 (helpers.vllm.pick_cpus); this one the next
    env = subprocess_env(VLLM_CPU_OMP_THREADS_BIND="1" if len(os.sched_getaffinity(0)) > 1 else "0")
    with ServerProcess(path, env=env, timeout=900) as s:
        yield s


def client(url: str) -> Any:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def test_plain_and_streaming(served: Any) -> None:
    c = client(served.url)
    r = c.chat.completions.create(model="tensorfabric-cloud", max_tokens=16, temperature=0,
                                  messages=[{"role": "user", "content": PROMPTS[0]}])
    assert r.choices[0].message.content
    tf = r.model_extra["tensorfabric"]
    assert tf["tier"] == "cloud" and not tf["degraded"], tf
    assert r.usage.completion_tokens > 0

    pieces, final = [], None
    for ch in c.chat.completions.create(model="tensorfabric-cloud", max_tokens=16, temperature=0,
                                        stream=True, messages=[{"role": "user", "content": PROMPTS[0]}]):
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.model_extra.get("tensorfabric"):
            final = ch.model_extra["tensorfabric"]
    assert final is not None and final["tier"] == "cloud" and not final["degraded"], final
    # the same greedy request, streamed or not, gives the same text
    assert "".join(pieces) == r.choices[0].message.content

    auto = c.chat.completions.create(model="tensorfabric", max_tokens=8, temperature=0,
                                     messages=[{"role": "user", "content": "Say hi."}])
    assert auto.model_extra["tensorfabric"]["tier"] in ("edge", "cloud")


def test_greedy_equals_plain_vllm(served: Any, plain_vllm: Any) -> None:
    c = client(served.url)
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        status, ref = post(plain_vllm.url, "/v1/chat/completions",
                           {"model": "default", "messages": msgs, "max_tokens": 32, "temperature": 0})
        assert status == 200, ref
        ours = c.chat.completions.create(model="tensorfabric-cloud", messages=msgs, max_tokens=32,
                                         temperature=0)
        assert ours.choices[0].message.content == ref["choices"][0]["message"]["content"], prompt
        assert ours.usage.completion_tokens == ref["usage"]["completion_tokens"]


def _gauge(text: str, name: str, tier: str) -> float:
    m = re.search(rf'^{name}{{tier="{tier}"}} ([0-9.eE+-]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_fifty_concurrent_clients_all_answered_in_one_batch(served: Any) -> None:
    import httpx

    c = client(served.url)
    seen_batch = [0.0]
    stop = threading.Event()

    def watch() -> None:  # the cloud's batch size as /metrics reports it
        while not stop.is_set():
            try:
                text = httpx.get(served.url.removesuffix("/v1") + "/metrics", timeout=10).text
                seen_batch[0] = max(seen_batch[0], _gauge(text, "tensorfabric_tier_batch_size", "cloud"))
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    t = threading.Thread(target=watch, daemon=True)
    t.start()

    def one(i: int) -> Any:
        return c.chat.completions.create(
            model="tensorfabric-cloud", max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": f"Give me a fun fact about the number {i}."}])

    try:
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
    finally:
        stop.set()
        t.join(5)
    assert len(answers) == 50
    for a in answers:
        tf = a.model_extra["tensorfabric"]
        assert tf["tier"] == "cloud" and not tf["degraded"], tf
        assert a.choices[0].message.content
    # continuous batching: vLLM ran many of them at once (a one-at-a-time loop shows 1)
    assert seen_batch[0] > 1, seen_batch
