"""The disaggregated proxy's connections, API key and bounds, against a real HTTP server on
loopback. The server can close a kept-alive connection when the next request comes on it
(what a vLLM server whose keep-alive ran out does when the proxy picks that connection in the
same instant: CI run of 2026-12-04 failed a request with ``ServerDisconnectedError`` this
way), and hold requests until released."""

from __future__ import annotations

import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

pytest.importorskip("aiohttp")

from tensorfabric import ConfigError  # noqa: E402
from tensorfabric.vllm._proxy import DisaggProxy  # noqa: E402

from helpers.vllm import post  # noqa: E402


class _Backend(http.server.ThreadingHTTPServer):
    """Answers a connection's first request (kept alive) and closes the connection unread on
    its second (``close_second``); ``drop_all`` closes every connection at its first request
    instead. With ``hold`` set, each request waits for ``release`` before its answer."""

    daemon_threads = True

    def __init__(self, drop_all: bool = False, close_second: bool = True,
                 hold: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.drop_all, self.close_second = drop_all, close_second
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.seen: list[tuple[str, int]] = []   # (path, how many this connection had before)
        self.auth: list[str | None] = []         # each request's Authorization header
        self.active = self.most = 0              # requests being answered now, at most
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
        srv = self.server
        with srv.lock:
            srv.seen.append((self.path, self.count))
            srv.auth.append(self.headers.get("Authorization"))
            srv.active += 1
            srv.most = max(srv.most, srv.active)
        try:
            self._answer(body)
        finally:
            with srv.lock:
                srv.active -= 1

    def _answer(self, body: bytes) -> None:
        self.count += 1
        if self.server.drop_all or (self.server.close_second and self.count > 1):
            self.close_connection = True   # no answer: the client sees the connection close
            return
        self.server.release.wait(30)
        req = json.loads(body)
        out = json.dumps({"choices": [{"text": "x", "max": req.get("max_tokens")}],
                          "kv_transfer_params": {"remote": "here"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def _serve(**kw: Any) -> Iterator[_Backend]:
    b = _Backend(**kw)
    t = threading.Thread(target=b.serve_forever, daemon=True)
    t.start()
    try:
        yield b
    finally:
        b.shutdown()
        b.server_close()


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)   # the proxy's default key


@pytest.fixture
def backend() -> Iterator[_Backend]:
    yield from _serve()


@pytest.fixture
def dropping() -> Iterator[_Backend]:
    yield from _serve(drop_all=True)


@pytest.fixture
def holding() -> Iterator[_Backend]:
    yield from _serve(close_second=False, hold=True)


def test_a_request_on_a_connection_the_server_closed_is_sent_again(backend: _Backend) -> None:
    with DisaggProxy([backend.url], [backend.url], mode="pull") as proxy:
        for i in range(3):
            status, body = _complete(proxy.url)
            assert status == 200, body
            assert body["choices"][0]["max"] == 5   # the decode request's answer
    # each request after the first reached the server on a kept-alive connection first
    # (closed unread) and again on a fresh one
    firsts = [n for _, n in backend.seen if n == 0]
    again = [n for _, n in backend.seen if n > 0]
    assert len(firsts) == 6 and again, backend.seen


def test_a_fresh_connection_closed_unanswered_is_not_sent_again(dropping: _Backend) -> None:
    with DisaggProxy([dropping.url], [dropping.url], mode="pull") as proxy:
        status, body = _complete(proxy.url)
    assert status == 502 and "prefill instance" in body["error"]["message"], body
    assert dropping.seen == [("/v1/completions", 0)]   # once: the server may have acted on it


def _complete(url: str, key: str | None = None) -> tuple[int, Any]:
    return post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 5}, 60, key=key)


def _refused(url: str) -> tuple[int, Any, str | None]:
    """A request the proxy answers with an error: its status, body and Retry-After."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/v1/completions", b"{}",
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    return err.value.code, json.loads(err.value.read()), err.value.headers.get("Retry-After")


def _get(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_seen(backend: _Backend, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(backend.seen) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(backend.seen) == n, backend.seen


def test_the_api_key_is_checked_and_the_instances_get_theirs(holding: _Backend) -> None:
    holding.release.set()
    with DisaggProxy([holding.url], [holding.url], mode="pull", api_key="client-key",
                     instance_api_key="instance-key") as proxy:
        for key in (None, "wrong", "client-ke", "client-key2"):
            status, body = _complete(proxy.url, key)
            assert status == 401 and "API key" in body["error"]["message"], (key, body)
        for path, want in (("/v1/models", 401), ("/nothing", 401), ("/health", 503)):
            assert _get(proxy.url + path) == want, path   # /health: open (the test server
            # has no GET, so the proxy calls the instances unhealthy)
        assert holding.seen == []   # refused before anything reached an instance
        status, body = _complete(proxy.url, "client-key")
        assert status == 200, body
        assert proxy.stats["refused_key"] == 6
    assert holding.auth == ["Bearer instance-key"] * 2   # the prefill and the decode request


def test_the_key_defaults_to_vllms_own_variable(monkeypatch: pytest.MonkeyPatch,
                                                  holding: _Backend) -> None:
    holding.release.set()
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    with DisaggProxy([holding.url], [holding.url], mode="pull") as proxy:
        assert _complete(proxy.url)[0] == 401
        assert _complete(proxy.url, "from-env")[0] == 200
    assert holding.auth == ["Bearer from-env"] * 2


def test_requests_beyond_max_pending_are_refused_at_once_then_served(holding: _Backend) -> None:
    with DisaggProxy([holding.url], [holding.url], mode="pull", max_pending=2) as proxy, \
            ThreadPoolExecutor(2) as pool:
        held = [pool.submit(_complete, proxy.url) for _ in range(2)]
        _wait_seen(holding, 2)   # both prefill requests are held
        status, body, retry_after = _refused(proxy.url)
        assert status == 503 and "max_pending=2" in body["error"]["message"], body
        assert retry_after == "1"
        holding.release.set()
        assert [f.result(60)[0] for f in held] == [200, 200]
        assert _complete(proxy.url)[0] == 200   # room again
        assert proxy.stats["refused_busy"] == 1


def test_connections_to_an_instance_are_bounded(holding: _Backend) -> None:
    with DisaggProxy([holding.url], [holding.url], mode="pull", max_connections=1) as proxy, \
            ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(_complete, proxy.url) for _ in range(3)]
        _wait_seen(holding, 1)
        time.sleep(0.5)
        assert len(holding.seen) == 1   # the others wait for the one connection
        holding.release.set()
        assert [f.result(60)[0] for f in futs] == [200, 200, 200]
    assert holding.most == 1 and len(holding.seen) == 6


def test_bad_bounds_and_keys_are_refused() -> None:
    for kw, msg in (({"max_pending": 0}, "max_pending must be"),
                    ({"max_connections": 1.5}, "max_connections must be"),
                    ({"api_key": ""}, "api_key must be"),
                    ({"instance_api_key": "a\nb"}, "instance_api_key must be")):
        with pytest.raises(ConfigError, match=msg):
            DisaggProxy(["http://a"], ["http://b"], **kw)
    # the cluster and the command refuse a bad key before starting any instance
    from tensorfabric.vllm._cluster import DisaggCluster

    with pytest.raises(ConfigError, match="api_key must be"):
        DisaggCluster(api_key="a\tb")
    typer_testing = pytest.importorskip("typer.testing")
    from tensorfabric.cli import build_app

    r = typer_testing.CliRunner().invoke(build_app(), ["vllm-disagg", "--api-key", ""])
    assert r.exit_code == 2 and "api_key must be" in r.output, r.output
