"""``tensorfabric serve`` with ``cloud.disaggregated: true`` on vLLM, and ``routing.spill: false``.

One served stack proves both: the cloud tier is a vLLM prefill instance and a vLLM decode
instance joined by tensorfabric's KV connector (behind its proxy), and the edge runs the
transformers runtime (float32, one request at a time) with spill off. The module starts two
vLLM instances (it needs no plain reference: the float32 edge's greedy answers are the model's,
equal to plain vLLM's on the shipped prompt set); the stack's start is the cost, so every check
here shares it and keeps max_tokens small.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helpers.vllm import edge_filled, edge_gauges, openai_client, subprocess_env

openai = pytest.importorskip("openai")
yaml = pytest.importorskip("yaml")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")


PROMPTS = ["What is the capital of France?", "List three primary colours."]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tensorfabric.serve import ServerProcess

    d = tmp_path_factory.mktemp("serve-vllm-disagg")
    cfg = {
        "server": {"port": 0, "request_timeout": 600},
        "cloud": {"engine": "vllm", "disaggregated": True, "kv_space_gib": 1},
        "routing": {"policy": "confidence", "spill": False},
    }
    path = Path(d) / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = subprocess_env(VLLM_CPU_OMP_THREADS_BIND="1" if len(os.sched_getaffinity(0)) > 1 else "0")
    with ServerProcess(path, env=env, timeout=900) as s:
        assert s.url.startswith("http://"), (s.url, "".join(s.output[-60:]))
        # the prefill/decode vLLM servers run in sessions of their own: stopping the stack must
        # still stop them (the cloud process closes its tier on SIGTERM)
        family = psutil.Process(s.proc.pid).children(recursive=True)
        names = {p.pid: " ".join(p.cmdline()[:3]) for p in family}
        yield s
    deadline = time.monotonic() + 60
    while True:
        alive = [p for p in family if _running(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for p in alive:
        p.kill()
    assert not alive, f"left running after the stack stopped: {[names[p.pid] for p in alive]}"


def _running(p: Any) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def test_disaggregated_cloud_answers_like_the_model(served: Any) -> None:
    """The cloud tier is the prefill/decode pair, and its greedy answers (plain and streamed)
    equal the float32 edge's, token for token: the decode instance continued from the KV cache
    the prefill instance made and tensorfabric's connector moved."""
    base = served.url.removesuffix("/v1")
    health = httpx.get(base + "/health", timeout=30).json()
    assert health["cloud"]["available"] and health["cloud"]["model"].endswith("-vllm-disagg"), health
    c = openai_client(served.url)
    for i, prompt in enumerate(PROMPTS):
        msgs = [{"role": "user", "content": prompt}]
        ref = c.chat.completions.create(model="tensorfabric-edge", messages=msgs, max_tokens=16, temperature=0)
        assert ref.model_extra["tensorfabric"]["tier"] == "edge"
        want = ref.choices[0].message.content
        if i == 0:
            r = c.chat.completions.create(model="tensorfabric-cloud", messages=msgs, max_tokens=16,
                                          temperature=0)  # fmt: skip
            tf = r.model_extra["tensorfabric"]
            assert tf["tier"] == "cloud" and not tf["degraded"], tf
            assert r.choices[0].message.content == want, prompt
        else:
            pieces, final = [], None
            for ch in c.chat.completions.create(model="tensorfabric-cloud", messages=msgs, max_tokens=16,
                                                temperature=0, stream=True):  # fmt: skip
                if ch.choices and ch.choices[0].delta.content:
                    pieces.append(ch.choices[0].delta.content)
                if ch.model_extra.get("tensorfabric"):
                    final = ch.model_extra["tensorfabric"]
            assert final is not None and final["tier"] == "cloud" and not final["degraded"], final
            assert "".join(pieces) == want, prompt


def test_spill_off_keeps_auto_requests_for_the_edge_probe(served: Any) -> None:
    """``routing.spill: false``: with the edge busy and a request queued behind it, an
    auto-routed request still waits for the edge's probe (never reason ``edge_busy``); the
    server's default (spill on) sends it to the cloud instead (test_serve_vllm.py)."""
    c = openai_client(served.url)

    def auto_request() -> Any:
        return c.chat.completions.create(model="tensorfabric", max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "What is 2+2?"}])

    with ThreadPoolExecutor(1) as pool:
        with edge_filled(served.url, requests=2, running=1, queued=1) as held:
            auto_f = pool.submit(auto_request)
            # it queues at the edge for its probe (a spill would answer it from the cloud now)
            deadline = time.monotonic() + 300
            while edge_gauges(served.url)[1] < 2:
                assert not auto_f.done(), ("the auto request did not wait for the edge: "
                                           f"{auto_f.result().model_extra['tensorfabric']}")
                assert time.monotonic() < deadline, "the auto request never queued at the edge"
                time.sleep(0.1)
        auto = auto_f.result(timeout=600)  # released: the held requests were aborted
    tf = auto.model_extra["tensorfabric"]
    assert tf["reason"] in ("confident", "low_confidence") and not tf["degraded"], tf
    assert auto.choices[0].message.content
    assert held[0].chunks + held[1].chunks > 0, held  # the running one was streaming
