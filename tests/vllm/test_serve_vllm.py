"""``tensorfabric serve`` with both tiers on vLLM: the openai client (plain, streaming, 50
concurrent clients), each tier's greedy answers against plain ``vllm serve``'s, and
``routing.spill`` (auto requests go to the cloud while the edge's slots are taken).

One served stack for the module: the cloud tier on vLLM (a child process) and the edge on the
``vllm`` runtime (in the server process, 2 slots so that its batching shows). Before it starts,
a plain vLLM server answers the reference prompts and stops, so the module never runs more
than two vLLM instances at once."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helpers.vllm import edge_filled, edge_gauges, openai_client, pick_cpus, post, subprocess_env, tier_gauge

openai = pytest.importorskip("openai")
yaml = pytest.importorskip("yaml")

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three primary colours.",
]


REF_TOKENS = {"cloud": 32, "edge": 16}


@pytest.fixture(scope="module")
def plain_refs(start_vllm: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Plain ``vllm serve``'s greedy answers, ``(tier, prompt) -> body``: the cloud's
    reference at 32 tokens, the edge's at 16 (the tiers run vLLM's worker inside its engine
    core: the answers must not depend on that). The server stops before the stack starts.

    Another listener holds the port it picked while it starts: it must start on another
    (vLLM binds its port after ~20 s of imports; another process can take it in between)."""
    # vLLM's own CPU default (the worker in a process of its own), not tensorfabric's
    plain = start_vllm("plain", cpus=pick_cpus(1)[0], port_taken=True,
                       env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert plain.port != plain.taken_port and plain.healthy()
    refs = {}
    try:
        for tier, n in REF_TOKENS.items():
            for prompt in PROMPTS:
                status, body = post(plain.url, "/v1/chat/completions",
                                    {"model": "default", "max_tokens": n, "temperature": 0,
                                     "messages": [{"role": "user", "content": prompt}]})  # fmt: skip
                assert status == 200, body
                refs[tier, prompt] = body
    finally:
        plain.stop(grace=10)
    return refs


@pytest.fixture(scope="module")
def served(plain_refs: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tensorfabric.serve import ServerProcess

    d = tmp_path_factory.mktemp("serve-vllm")
    cfg = {
        "server": {"port": 0, "request_timeout": 600},
        "cloud": {"engine": "vllm", "kv_space_gib": 1, "max_num_seqs": 64},
        "edge": {"runtime": "vllm", "kv_space_gib": 1, "max_num_seqs": 2},
        "routing": {"policy": "confidence"},  # spill: on (the default)
    }
    path = Path(d) / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the reference server binds CPU 0 (helpers.vllm.pick_cpus); this one the next
    env = subprocess_env(VLLM_CPU_OMP_THREADS_BIND="1" if len(os.sched_getaffinity(0)) > 1 else "0")
    with ServerProcess(path, env=env, timeout=900) as s:
        yield s


def test_plain_and_streaming(served: Any) -> None:
    c = openai_client(served.url)
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


def test_greedy_equals_plain_vllm(served: Any, plain_refs: Any) -> None:
    c = openai_client(served.url)
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        ref = plain_refs["cloud", prompt]
        ours = c.chat.completions.create(model="tensorfabric-cloud", messages=msgs,
                                         max_tokens=REF_TOKENS["cloud"], temperature=0)
        assert ours.choices[0].message.content == ref["choices"][0]["message"]["content"], prompt
        assert ours.usage.completion_tokens == ref["usage"]["completion_tokens"]


def test_edge_on_vllm_batches_and_answers_like_plain_vllm(served: Any, plain_refs: Any) -> None:
    """The vLLM edge runtime: the float32 model, so its greedy answers equal plain vLLM's; two
    requests at once run in one batch (its 2 slots)."""
    import httpx

    health = httpx.get(served.url.removesuffix("/v1") + "/health", timeout=30).json()
    assert health["edge"]["model"].endswith("-vllm"), health
    c = openai_client(served.url)

    def edge(prompt: str) -> Any:
        return c.chat.completions.create(model="tensorfabric-edge", max_tokens=REF_TOKENS["edge"],
                                         temperature=0,
                                         messages=[{"role": "user", "content": prompt}])

    with ThreadPoolExecutor(2) as pool:
        ours = list(pool.map(edge, PROMPTS[:2]))
    for prompt, r in zip(PROMPTS[:2], ours):
        tf = r.model_extra["tensorfabric"]
        assert tf["tier"] == "edge" and tf["reason"] == "user_choice", tf
        ref = plain_refs["edge", prompt]
        assert r.choices[0].message.content == ref["choices"][0]["message"]["content"], prompt


def test_spill_sends_auto_requests_to_the_cloud_while_the_edge_is_full(served: Any) -> None:
    """``routing.spill`` (on by default): with both edge slots taken and more edge requests
    queued, an auto-routed request goes straight to the cloud (reason ``edge_busy``) instead of
    queueing for a probe; the edge requests stream from the edge meanwhile."""
    c = openai_client(served.url)

    def auto_request() -> Any:
        return c.chat.completions.create(model="tensorfabric", max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "What is 2+2?"}])

    with ThreadPoolExecutor(1) as pool:
        # 2 running and 4+ queued at the edge (its expected wait is then several times one
        # request's, the cloud's about one request's), held until the auto request is answered
        with edge_filled(served.url, requests=8, running=2, queued=4) as held:
            auto_f = pool.submit(auto_request)
            # answered while the edge is held; a ninth request in the edge's queue is this one,
            # waiting for a probe (spill broken): fail now rather than when the client times out
            deadline = time.monotonic() + 300
            while not auto_f.done():
                assert edge_gauges(served.url)[1] <= 8 - 2, \
                    "the auto request queued at the edge behind the held requests"
                assert time.monotonic() < deadline, "the auto request was not answered in 300 s"
                time.sleep(0.1)
        auto = auto_f.result()
    tf = auto.model_extra["tensorfabric"]
    assert tf["tier"] == "cloud" and tf["reason"] == "edge_busy" and not tf["degraded"], tf
    assert auto.choices[0].message.content
    assert sum(h.chunks > 0 for h in held) >= 2, held  # the two running ones were streaming


def test_fifty_concurrent_clients_all_answered_in_one_batch(served: Any) -> None:
    import httpx

    c = openai_client(served.url)
    seen_batch = [0.0]
    stop = threading.Event()

    def watch() -> None:  # the cloud's batch size as /metrics reports it
        while not stop.is_set():
            try:
                text = httpx.get(served.url.removesuffix("/v1") + "/metrics", timeout=10).text
                seen_batch[0] = max(seen_batch[0], tier_gauge(text, "tensorfabric_tier_batch_size", "cloud"))
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
