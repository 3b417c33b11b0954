"""One OpenAI endpoint in front of N prefill and M decode vLLM instances.

Like vLLM's disaggregated proxy examples: a completion or chat request goes to a prefill
instance first (``max_tokens=1``, ``kv_transfer_params={"do_remote_decode": true}``); the
``kv_transfer_params`` it answers with (where its KV blocks are, and a grant to take them) go
with the original request to a decode instance, whose answer (streamed or not) is the reply.
Instances are picked round robin.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any, Sequence

from .._errors import ConfigError

_PATHS = ("/v1/completions", "/v1/chat/completions")


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    pre = dict(body)
    pre["max_tokens"] = 1
    if "max_completion_tokens" in pre:
        pre["max_completion_tokens"] = 1
    pre["stream"] = False
    pre.pop("stream_options", None)
    pre["kv_transfer_params"] = {"do_remote_decode": True}
    return pre


class DisaggProxy:
    """Runs the proxy on its own thread and event loop: ``start()``, ``url``, ``close()``."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], *,
                 host: str = "127.0.0.1", port: int = 0, timeout: float = 600.0) -> None:
        if not prefill or not decode:
            raise ConfigError("the proxy needs at least one prefill and one decode URL")
        self.prefill, self.decode = list(prefill), list(decode)
        self.host, self.port, self.timeout = host, port, timeout
        self._pi = itertools.cycle(range(len(self.prefill)))
        self._di = itertools.cycle(range(len(self.decode)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats = {"requests": 0, "prefill_s": 0.0, "failed": 0}

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
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0))
        app = web.Application(client_max_size=16 << 20)
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
        t0 = time.perf_counter()
        try:
            async with self._session.post(pre_url, json=_prefill_body(body)) as r:
                pre = await r.json(content_type=None)
                if r.status != 200:
                    self.stats["failed"] += 1
                    return web.json_response(pre, status=r.status)
        except Exception as exc:  # noqa: BLE001 - the client gets a clean 502
            self.stats["failed"] += 1
            return web.json_response(
                {"error": {"message": f"prefill instance {pre_url} failed: {exc!r}"}}, status=502)
        self.stats["prefill_s"] += time.perf_counter() - t0
        dec = dict(body)
        if pre.get("kv_transfer_params"):
            dec["kv_transfer_params"] = pre["kv_transfer_params"]
        try:
            return await self._forward(request, dec_url, dec)
        except Exception as exc:  # noqa: BLE001
            self.stats["failed"] += 1
            return web.json_response(
                {"error": {"message": f"decode instance {dec_url} failed: {exc!r}"}}, status=502)

    async def _forward(self, request: Any, url: str, body: dict[str, Any]) -> Any:
        from aiohttp import web

        async with self._session.post(url, json=body) as r:
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

        async with self._session.get(self.decode[0] + "/v1/models") as r:
            return web.json_response(await r.json(content_type=None), status=r.status)

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        bad = []
        for url in self.prefill + self.decode:
            try:
                async with self._session.get(url + "/health",
                                             timeout=__import__("aiohttp").ClientTimeout(total=3)) as r:
                    if r.status != 200:
                        bad.append(url)
            except Exception:  # noqa: BLE001
                bad.append(url)
        return web.json_response({"ok": not bad, "unhealthy": bad}, status=503 if bad else 200)

    def close(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)

    def __enter__(self) -> DisaggProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
