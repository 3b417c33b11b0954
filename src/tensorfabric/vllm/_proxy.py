"""One OpenAI endpoint in front of N prefill and M decode vLLM instances.

Like vLLM's disaggregated proxy examples: a completion or chat request goes to a prefill
instance first (``max_tokens=1``, ``kv_transfer_params={"do_remote_decode": true}``); the
``kv_transfer_params`` it answers with (where its KV blocks are, and a grant to take them) go
with the original request to a decode instance, whose answer (streamed or not) is the reply.
Instances are picked round robin.

Push mode (the default, ``mode="push"``): once a prefill instance has answered once, the proxy
knows its engine's address, and sends later requests to the prefill and the decode instance
at the same time, both with one fresh random push id; the decode instance offers its blocks
at once and the prefill instance writes each layer's KV into them while it computes (see
``_push.py``). ``mode="pull"`` keeps the sequential protocol above for every request.

Pooled connections: an idle one is closed after ``_KEEPALIVE_S``, before vLLM's server closes
it (uvicorn's keep-alive, 5 s by default), and a request whose reused connection the server
closed before any answer came is sent again on another (the rule browsers follow): a server
closing an idle connection just as the proxy picks it would otherwise fail the request.

Bounds: at most ``max_pending`` requests in flight (more are answered 503 at once, with
``Retry-After``), at most ``max_connections`` open connections to each instance (a request
beyond that waits for one within its timeout). ``api_key`` (default ``$VLLM_API_KEY``, as
``vllm serve``): clients must send ``Authorization: Bearer KEY`` everywhere but ``/health``
(401 otherwise); ``instance_api_key`` (default: the same key) goes to the instances.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import secrets
import threading
import time
from typing import Any, Sequence

from .._errors import ConfigError

_PATHS = ("/v1/completions", "/v1/chat/completions")
_KEEPALIVE_S = 2.0   # below the servers' keep-alive (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s)
_SENDS = 3           # attempts of one request while each fails on a reused connection


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    pre = dict(body)
    pre["max_tokens"] = 1
    if "max_completion_tokens" in pre:
        pre["max_completion_tokens"] = 1
    pre["stream"] = False
    pre.pop("stream_options", None)
    pre["kv_transfer_params"] = {"do_remote_decode": True}
    return pre


def check_key(name: str, key: str | None) -> None:
    """An API key goes in an HTTP header: printable ASCII, not empty (None: no key)."""
    if key is not None and (not isinstance(key, str) or not key or not key.isascii()
                            or not key.isprintable()):
        raise ConfigError(f"{name} must be a non-empty printable ASCII string")


async def _mark_reused(session: Any, ctx: Any, params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, dict):
        ctx.trace_request_ctx["reused"] = True


class DisaggProxy:
    """Runs the proxy on its own thread and event loop: ``start()``, ``url``, ``close()``."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], *,
                 host: str = "127.0.0.1", port: int = 0, timeout: float = 600.0,
                 mode: str = "push", api_key: str | None = None,
                 instance_api_key: str | None = None, max_pending: int = 1024,
                 max_connections: int = 256) -> None:
        if not prefill or not decode:
            raise ConfigError("the proxy needs at least one prefill and one decode URL")
        if mode not in ("push", "pull"):
            raise ConfigError(f"mode must be 'push' or 'pull', got {mode!r}")
        for name, n in (("max_pending", max_pending), ("max_connections", max_connections)):
            if type(n) is not int or n < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {n!r}")
        if api_key is None:
            api_key = os.environ.get("VLLM_API_KEY") or None
        check_key("api_key", api_key)
        check_key("instance_api_key", instance_api_key)
        self.api_key = api_key
        self.instance_api_key = instance_api_key if instance_api_key is not None else api_key
        self.max_pending, self.max_connections = max_pending, max_connections
        self._pending = 0
        self.mode = mode
        self._engines: dict[str, dict[str, Any]] = {}   # prefill URL -> its engine and layout
        self.prefill, self.decode = list(prefill), list(decode)
        self.host, self.port, self.timeout = host, port, timeout
        self._pi = itertools.cycle(range(len(self.prefill)))
        self._di = itertools.cycle(range(len(self.decode)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats = {"requests": 0, "prefill_s": 0.0, "failed": 0, "pushed": 0,
                      "refused_busy": 0, "refused_key": 0}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> DisaggProxy:
        self._thread = threading.Thread(target=self._run, name="tf-vllm-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise ConfigError("the proxy did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_mark_reused)
        key = self.instance_api_key
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), trace_configs=[trace],
            headers={"Authorization": f"Bearer {key}"} if key else None,
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=self.max_connections,
                                           keepalive_timeout=_KEEPALIVE_S))
        app = web.Application(client_max_size=16 << 20, middlewares=[self._gate()])
        for path in _PATHS:
            app.router.add_post(path, self._handle)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        if self.port == 0 and server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await self._session.close()

    def _gate(self) -> Any:
        """The middleware in front of every path but ``/health`` (open, as on vLLM's server):
        the API key, then the bound on requests in flight."""
        from aiohttp import web

        want = f"Bearer {self.api_key}".encode() if self.api_key else None

        @web.middleware
        async def gate(request: Any, handler: Any) -> Any:
            if request.path == "/health":
                return await handler(request)
            if want is not None and not hmac.compare_digest(
                    request.headers.get("Authorization", "").encode(errors="replace"), want):
                self.stats["refused_key"] += 1
                return web.json_response(
                    {"error": {"message": "missing or wrong API key: send "
                                          "'Authorization: Bearer KEY'"}}, status=401)
            if self._pending >= self.max_pending:
                self.stats["refused_busy"] += 1
                return web.json_response(
                    {"error": {"message": f"proxy busy: {self._pending} requests in flight "
                                          f"(max_pending={self.max_pending}); retry"}},
                    status=503, headers={"Retry-After": "1"})
            self._pending += 1
            try:
                return await handler(request)
            finally:
                self._pending -= 1

        return gate

    async def _send(self, method: str, url: str, **kw: Any) -> Any:
        """The response to one request (its headers read). Sent again, up to ``_SENDS`` times
        in all, while it fails on a reused connection before any answer: the server had
        closed that connection (an idle one it timed out, or a restart), so it never read the
        request. A failure on a fresh connection, or after an answer began, is the caller's."""
        import aiohttp

        for _ in range(_SENDS - 1):
            ctx: dict[str, bool] = {}
            try:
                return await self._session.request(method, url, trace_request_ctx=ctx, **kw)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if not ctx.get("reused"):
                    raise
        return await self._session.request(method, url, **kw)   # the last try, as it comes

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "body must be an object"}}, status=400)
        path = request.path
        pre_url = self.prefill[next(self._pi)] + path
        dec_url = self.decode[next(self._di)] + path
        self.stats["requests"] += 1
        info = self._engines.get(pre_url) if self.mode == "push" else None
        if info is not None:
            return await self._push(request, pre_url, dec_url, body, info)
        t0 = time.perf_counter()
        try:
            async with await self._send("POST", pre_url, json=_prefill_body(body)) as r:
                pre = await r.json(content_type=None)
                if r.status != 200:
                    self.stats["failed"] += 1
                    return web.json_response(pre, status=r.status)
        except Exception as exc:  # noqa: BLE001 - the client gets a clean 502
            self.stats["failed"] += 1
            return web.json_response(
                {"error": {"message": f"prefill instance {pre_url} failed: {exc!r}"}}, status=502)
        self.stats["prefill_s"] += time.perf_counter() - t0
        self._learn(pre_url, pre)
        dec = dict(body)
        if pre.get("kv_transfer_params"):
            dec["kv_transfer_params"] = pre["kv_transfer_params"]
        try:
            return await self._forward(request, dec_url, dec)
        except Exception as exc:  # noqa: BLE001
            self.stats["failed"] += 1
            return web.json_response(
                {"error": {"message": f"decode instance {dec_url} failed: {exc!r}"}}, status=502)

    def _learn(self, pre_url: str, pre: Any) -> None:
        params = pre.get("kv_transfer_params") if isinstance(pre, dict) else None
        if isinstance(params, dict) and params.get("tf_engine") and params.get("tf_layout"):
            self._engines[pre_url] = {"tf_engine": params["tf_engine"],
                                      "tf_layout": params["tf_layout"]}

    async def _push(self, request: Any, pre_url: str, dec_url: str, body: dict[str, Any],
                    info: dict[str, Any]) -> Any:
        """Both requests at once. The decode answer is the reply; a prefill that fails drops
        the decode request (vLLM aborts it) and its error is the reply; a decode instance that
        fails first drops the prefill request and the reply is a 502 at once."""
        from aiohttp import web

        pid = secrets.token_hex(16)
        pre = _prefill_body(body)
        pre["kv_transfer_params"] = {"do_remote_decode": True, "tf_push": pid}
        dec = dict(body)
        dec["kv_transfer_params"] = {"do_remote_prefill": True, "tf_push": pid, **info}
        self.stats["pushed"] += 1
        t0 = time.perf_counter()
        pre_task = asyncio.ensure_future(self._prefill_call(pre_url, pre))
        dec_task = asyncio.ensure_future(self._send("POST", dec_url, json=dec))
        await asyncio.wait({pre_task, dec_task}, return_when=asyncio.FIRST_COMPLETED)
        if dec_task.done() and dec_task.exception() is not None:
            pre_task.cancel()
            self.stats["failed"] += 1
            msg = f"decode instance {dec_url} failed: {dec_task.exception()!r}"
            return web.json_response({"error": {"message": msg}}, status=502)
        status, answer = await pre_task
        self.stats["prefill_s"] += time.perf_counter() - t0
        if status != 200:
            self._engines.pop(pre_url, None)   # learn the address again (a restart?)
            self.stats["failed"] += 1
            await self._drop(dec_task)
            return web.json_response(answer, status=status)
        self._learn(pre_url, answer)
        try:
            r = await dec_task
        except Exception as exc:  # noqa: BLE001
            self.stats["failed"] += 1
            return web.json_response(
                {"error": {"message": f"decode instance {dec_url} failed: {exc!r}"}}, status=502)
        async with r:
            return await self._relay(request, r, body)

    async def _prefill_call(self, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        try:
            async with await self._send("POST", url, json=body) as r:
                return r.status, await r.json(content_type=None)
        except Exception as exc:  # noqa: BLE001 - the client gets a clean 502
            return 502, {"error": {"message": f"prefill instance {url} failed: {exc!r}"}}

    @staticmethod
    async def _drop(task: Any) -> None:
        task.cancel()
        try:
            r = await task
        except BaseException:  # noqa: BLE001 - cancelled or failed: nothing to release
            return
        r.close()

    async def _forward(self, request: Any, url: str, body: dict[str, Any]) -> Any:
        async with await self._send("POST", url, json=body) as r:
            return await self._relay(request, r, body)

    async def _relay(self, request: Any, r: Any, body: dict[str, Any]) -> Any:
        from aiohttp import web

        if not body.get("stream"):
            return web.json_response(await r.json(content_type=None), status=r.status)
        resp = web.StreamResponse(status=r.status, headers={
            "Content-Type": r.headers.get("Content-Type", "text/event-stream")})
        await resp.prepare(request)
        async for chunk in r.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        async with await self._send("GET", self.decode[0] + "/v1/models") as r:
            return web.json_response(await r.json(content_type=None), status=r.status)

    async def _health(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        bad = []
        for url in self.prefill + self.decode:
            try:
                async with await self._send("GET", url + "/health",
                                            timeout=aiohttp.ClientTimeout(total=3)) as r:
                    if r.status != 200:
                        bad.append(url)
            except Exception:  # noqa: BLE001
                bad.append(url)
        return web.json_response({"ok": not bad, "unhealthy": bad, "prefill": self.prefill,
                                  "decode": self.decode, "mode": self.mode},
                                 status=503 if bad else 200)

    def close(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)

    def __enter__(self) -> DisaggProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
