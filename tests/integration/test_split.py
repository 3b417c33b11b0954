"""Edge/cloud tiers without HTTP: layer-split identity, and a slow / stopped / returning cloud.

The cloud tier is a real child process (``python -m tensorfabric.split cloud``); the edge tier
runs in the test process and talks to it over the engine.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import subprocess_env

pytestmark = [pytest.mark.model, pytest.mark.slow]

SECRET = "split-test-secret"
K = 8


def cfg(**over):  # type: ignore[no-untyped-def]
    from tensorfabric.split import parse_config

    base = {
        "secret": SECRET,
        "mode": "route",
        "layer_split": {"layers_at_edge": K},
        "cloud": {"timeout": 3.0, "connect_timeout": 2.0, "engine": "transformers"},
        "health": {"backoff_initial": 0.2, "backoff_max": 1.0, "probe_timeout": 1.0},
        "server": {"request_timeout": 60},
    }
    base.update(over)
    return parse_config(base)


@pytest.fixture(scope="module")
def cloud():  # type: ignore[no-untyped-def]
    from tensorfabric.serve import start_cloud_process

    proc = start_cloud_process(cfg(), timeout=300, env=subprocess_env())
    yield proc
    os.kill(proc.proc.pid, signal.SIGCONT)
    proc.stop()


@pytest.fixture(scope="module")
def full():  # type: ignore[no-untyped-def]
    from tensorfabric.split._lm import load_chat_model

    m = load_chat_model()
    m.warmup()
    return m


def run(edge, text: str, max_tokens: int = 16, explicit: str | None = "cloud", on_text=None):  # type: ignore[no-untyped-def]
    from tensorfabric.split._edge import ChatRequest, Done, RouteInfo

    parts, done, route = [], None, None
    for ev in edge.chat(ChatRequest([{"role": "user", "content": text}], max_tokens=max_tokens, explicit=explicit)):
        if isinstance(ev, RouteInfo):
            route = ev
        elif isinstance(ev, Done):
            done = ev
        else:
            parts.append(ev)
            if on_text is not None:
                on_text(len(parts))
    return "".join(parts), route, done


def test_layer_split_output_is_identical_to_the_whole_model(cloud, full) -> None:  # type: ignore[no-untyped-def]
    from tensorfabric.split import SplitConfigError
    from tensorfabric.split._edge import EdgeTier

    text = "List three prime numbers and say why they are prime."
    ids = full.encode_chat([{"role": "user", "content": text}])
    with full.lock:
        steps = list(full.stream(ids, max_new_tokens=16))
    reference = full.decode([s.token_id for s in steps if not s.stop])

    edge = EdgeTier(cfg(mode="layer_split"), full, cloud.address, full_model=full)
    try:
        out, route, done = run(edge, text)
        assert (route.decision.tier, done.tier, done.degraded) == ("cloud", "cloud", False)
        assert out == reference
        assert done.completion_tokens == len([s for s in steps if not s.stop])
        # hidden states crossed with engine writes: the prompt's, then one row per new token
        # (the last token is not fed back)
        n_rows = len(ids) + done.completion_tokens - 1 + (done.finish_reason == "stop")
        assert edge.hidden_bytes_shipped == n_rows * full.config.hidden_size * 4
    finally:
        edge.close()

    wrong = EdgeTier(cfg(mode="layer_split", layer_split={"layers_at_edge": K - 2}), full,
                     cloud.address, full_model=full)  # fmt: skip
    try:
        with pytest.raises(SplitConfigError, match="layer split mismatch"):
            run(wrong, text, max_tokens=2)
    finally:
        wrong.close()


def test_stalled_cloud_edge_takes_over_then_cloud_returns(cloud, full) -> None:  # type: ignore[no-untyped-def]
    from tensorfabric.split._edge import EdgeTier

    edge = EdgeTier(cfg(), full, cloud.address)
    pid = cloud.proc.pid
    try:
        text = "Write a short poem about the sea."
        healthy, _, done0 = run(edge, text, max_tokens=24)
        assert done0.tier == "cloud" and not done0.degraded

        # Freeze the cloud after it streamed a few tokens: the edge must finish the answer.
        stopped = []

        taken_over = []

        def freeze(n: int) -> None:
            if n == 3 and not stopped:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(time.monotonic())
            elif n == 4:
                taken_over.append(time.monotonic())   # the first token after the freeze

        out, _, done = run(edge, text, max_tokens=24, on_text=freeze)
        assert stopped, "the cloud never streamed"
        assert done.tier == "cloud+edge" and done.degraded and "went silent" in done.cloud_error
        assert done.completion_tokens == 24 or done.finish_reason == "stop"
        assert out[:5] == healthy[:5]  # the cloud's first tokens were kept
        # the stall was noticed after cloud.timeout (3 s), not waited out: the edge's first token
        # came well inside request_timeout (60 s); what the edge then generates is not timed
        assert taken_over and taken_over[0] - stopped[0] < 45
        assert not edge.cloud_available

        # While the breaker is open, cloud requests are answered at once by the edge.
        out2, route2, done2 = run(edge, "Hello!", max_tokens=4)
        # routed as cloud_down: no cloud attempt was made (the reason says so, no clock needed)
        assert (route2.decision.reason, done2.tier, done2.degraded) == ("cloud_down", "edge", True)
        assert out2

        os.kill(pid, signal.SIGCONT)
        assert edge.health.wait_available(30), edge.health.last_error
        out3, _, done3 = run(edge, text, max_tokens=24)
        assert done3.tier == "cloud" and not done3.degraded
        assert out3 == healthy  # the same cloud, the same greedy answer
    finally:
        os.kill(pid, signal.SIGCONT)
        edge.close()


def test_disaggregated_cloud_answers_like_the_whole_model(full) -> None:  # type: ignore[no-untyped-def]
    """cloud.disaggregated: the cloud tier generates on tensorfabric.kv's prefill and decode
    worker processes (KV cache moved with write_pages); greedy output equals one process."""
    import threading

    from tensorfabric.split._cloud import CloudTier
    from tensorfabric.split._edge import EdgeTier

    # Not a failover test: the cloud tier runs in this process beside the edge and the
    # reference model, and in a suite run two vLLM servers took the cores; the edge answered a
    # healthy cloud's request (cloud.dead_after's 1.5 s of silence, or the module's 1 s health
    # probe with one failure to open, is short for a starved process). Both are generous here.
    link = {"timeout": 30.0, "dead_after": 20.0}
    tier = CloudTier(cfg(cloud={"disaggregated": True, **link}), model=full)
    th = threading.Thread(target=tier.serve_forever, daemon=True)
    th.start()
    health = {"probe_timeout": 10.0, "failures_to_open": 3, "backoff_initial": 0.2}
    edge = EdgeTier(cfg(cloud=link, health=health), full, tier.address)
    try:
        text = "Name three colors."
        ids = full.encode_chat([{"role": "user", "content": text}])
        with full.lock:
            ref = full.decode([s.token_id for s in full.stream(ids, max_new_tokens=12) if not s.stop])
        out, route, done = run(edge, text, max_tokens=12)
        assert done.tier == "cloud" and not done.degraded, (route.decision, done.cloud_error,
                                                            edge.health.last_error)
        assert out == ref and tier.disagg is not None and tier.served == 1
    finally:
        edge.close()
        tier.close()
        th.join(5)
