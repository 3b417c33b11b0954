"""Admission control through the HTTP API: a request that the edge queue would keep past
``server.request_timeout`` gets 429 with Retry-After at once, not a 503 after the wait."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")


def test_full_edge_queue_answers_429_at_once() -> None:
    from starlette.testclient import TestClient

    from tensorfabric.serve._app import create_app
    from tensorfabric.split import parse_config
    from tensorfabric.split._edge import EdgeTier
    from tensorfabric.split._lm import load_chat_model

    cfg = parse_config({"server": {"request_timeout": 20}, "pii": {"enabled": False},
                        "routing": {"policy": "edge_only"}})  # fmt: skip
    model = load_chat_model(quantize="int8")
    edge = EdgeTier(cfg, model, None)
    app = create_app(edge, max_queue=8)
    body = {"model": "tensorfabric", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=body)  # measured: the edge's hold time
        assert r.status_code == 200 and edge.edge_load.mean_hold is not None
        # Another request holds the model (as a long generation would), and the edge learnt
        # that each request holds it for 15 s: one more would wait 15 + 15 s > 20 s.
        edge.edge_load.mean_hold = 15.0
        model.acquire(5)
        try:
            t = time.monotonic()
            r = client.post("/v1/chat/completions", json=body)
            waited = time.monotonic() - t
        finally:
            model.lock.release()
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        assert waited < 15  # refused up front, not after sitting in the queue
        # free again: admitted (one request ahead of none: 15 s < 20 s)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    edge.close()


def test_server_process_interrupted_while_starting_leaves_no_stack(tmp_path) -> None:
    """An exception raised into ``ServerProcess`` while it waits for the URL (pytest-timeout's,
    a Ctrl-C) stops the child's whole process group: a vLLM test that timed out in its setup
    had left ``tensorfabric serve`` and its cloud tier running for the rest of the suite."""
    import signal

    psutil = pytest.importorskip("psutil")
    from tensorfabric.serve import ServerProcess

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("server: {port: 0}\npii: {enabled: false}\nrouting: {policy: edge_only}\n")
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(2)  # the child is still importing: its URL is far off
    try:
        with pytest.raises(Interrupted):
            ServerProcess(cfg, timeout=600)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    alive = [p for p in new if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
