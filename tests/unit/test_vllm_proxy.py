"""The disaggregated proxy's pooled connections, against a real HTTP server on loopback that
closes a kept-alive connection when the next request comes on it (what a vLLM server whose
keep-alive ran out does when the proxy picks that connection in the same instant: CI run of
2026-12-04 failed a request with ``ServerDisconnectedError`` this way)."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any, Iterator

import pytest

pytest.importorskip("aiohttp")

from tensorfabric.vllm._proxy import DisaggProxy  # noqa: E402

from helpers.vllm import post  # noqa: E402


class _Backend(http.server.ThreadingHTTPServer):
    """Answers a connection's first request (kept alive) and closes the connection unread on
    its second; ``drop_all`` closes every connection at its first request instead."""

    daemon_threads = True

    def __init__(self, drop_all: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.drop_all = drop_all
        self.seen: list[tuple[str, int]] = []   # (path, how many this connection had before)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Backend

    def setup(self) -> None:
        super().setup()
        self.count = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.seen.append((self.path, self.count))
        self.count += 1
        if self.server.drop_all or self.count > 1:
            self.close_connection = True   # no answer: the client sees the connection close
            return
        req = json.loads(body)
        out = json.dumps({"choices": [{"text": "x", "max": req.get("max_tokens")}],
                          "kv_transfer_params": {"remote": "here"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def _serve(drop_all: bool = False) -> Iterator[_Backend]:
    b = _Backend(drop_all)
    t = threading.Thread(target=b.serve_forever, daemon=True)
    t.start()
    try:
        yield b
    finally:
        b.shutdown()
        b.server_close()


@pytest.fixture
def backend() -> Iterator[_Backend]:
    yield from _serve()


@pytest.fixture
def dropping() -> Iterator[_Backend]:
    yield from _serve(drop_all=True)


def test_a_request_on_a_connection_the_server_closed_is_sent_again(backend: _Backend) -> None:
    with DisaggProxy([backend.url], [backend.url], mode="pull") as proxy:
        for i in range(3):
            status, body = post(proxy.url, "/v1/completions", {"prompt": "hi", "max_tokens": 5})
            assert status == 200, body
            assert body["choices"][0]["max"] == 5   # the decode request's answer
    # each request after the first reached the server on a kept-alive connection first
    # (closed unread) and again on a fresh one
    firsts = [n for _, n in backend.seen if n == 0]
    again = [n for _, n in backend.seen if n > 0]
    assert len(firsts) == 6 and again, backend.seen


def test_a_fresh_connection_closed_unanswered_is_not_sent_again(dropping: _Backend) -> None:
    with DisaggProxy([dropping.url], [dropping.url], mode="pull") as proxy:
        status, body = post(proxy.url, "/v1/completions", {"prompt": "hi", "max_tokens": 5})
    assert status == 502 and "prefill instance" in body["error"]["message"], body
    assert dropping.seen == [("/v1/completions", 0)]   # once: the server may have acted on it
