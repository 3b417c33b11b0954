"""The API-server side of weight updates: an ASGI middleware vLLM loads with ``--middleware``.

It adds four authenticated routes under ``/tensorfabric/weights/`` (``params``, ``join``,
``state``, ``switch``) that reach the worker extension (``_weights_ext``) through the engine
client's ``collective_rpc``, so no dev-mode route (``VLLM_SERVER_DEV_MODE``) is needed; and it
stamps every response with ``x-tensorfabric-weights-version``, the version that served it.

A switch is atomic per request: the middleware stops admitting requests, waits (bounded) until
the requests in flight have finished, has the worker load the staged version between engine
steps, clears the prefix cache (its KV came from the old weights), records the new version and
lets the queued requests in. So every request runs wholly on one version, and its header names
it. Requests are held for the length of the switch (the reload: ~1 s for the default model).

Control requests carry ``x-tensorfabric-auth: TS:NONCE:MAC`` (``sign_headers``): a BLAKE2b MAC
keyed from ``$TENSORFABRIC_SECRET`` over the time, a nonce, the path and the body; stale (over
120 s) or replayed ones are refused with 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict
from typing import Any

#: the value of ``--middleware``
MIDDLEWARE = "tensorfabric.vllm._weights_http.WeightsMiddleware"
HEADER = "x-tensorfabric-weights-version"
AUTH_HEADER = "x-tensorfabric-auth"
PREFIX = "/tensorfabric/weights/"
MAX_BODY = 16 << 20
MAX_SKEW_S = 120.0
_MAX_NONCES = 4096
_PROBE_S = 5.0  # how long a failed drain waits for the engine's answer to a state RPC


def http_key(secret: str | bytes) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    return hashlib.blake2b(raw, digest_size=32, person=b"tf-weights-http").digest()


def _mac(key: bytes, ts: str, nonce: str, path: str, body: bytes) -> str:
    msg = f"{ts}\n{nonce}\n{path}\n".encode() + body
    return hashlib.blake2b(msg, key=key, digest_size=32).hexdigest()


def sign_headers(secret: str | bytes, path: str, body: bytes) -> dict[str, str]:
    """The auth header of a control request to ``path`` with ``body``."""
    ts, nonce = f"{time.time():.3f}", secrets.token_hex(12)
    return {AUTH_HEADER: f"{ts}:{nonce}:{_mac(http_key(secret), ts, nonce, path, body)}"}


class WeightsMiddleware:
    """ASGI middleware (``--middleware tensorfabric.vllm._weights_http.WeightsMiddleware``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.version = 0
        self._running: dict[int, tuple[float, str]] = {}  # request number -> (start, path)
        self._seq = 0
        self._open = asyncio.Event()  # cleared while a switch runs
        self._open.set()
        self._drained = asyncio.Event()  # set while no request runs
        self._drained.set()
        self._switching = asyncio.Lock()
        self._nonces: OrderedDict[str, float] = OrderedDict()
        secret = os.environ.get("TENSORFABRIC_SECRET", "")
        self._key = http_key(secret) if secret else b""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith(PREFIX):
            await self._control(scope, receive, send)
            return
        gated = scope.get("method") == "POST"
        if gated:
            while not self._open.is_set():  # a switch runs: wait (woken, check again: the
                await self._open.wait()     # next switch may have closed it since)
            self._seq += 1
            rid = self._seq
            self._running[rid] = (time.monotonic(), path)
            self._drained.clear()
        version = str(self.version).encode()

        async def stamped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), version)]
            await send(message)

        try:
            await self.app(scope, receive, stamped)
        finally:
            if gated:  # no await here: a cancelled request still leaves the count
                del self._running[rid]
                if not self._running:
                    self._drained.set()

    # -- control routes ------------------------------------------------------------------------
    async def _control(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > MAX_BODY:
                await _reply(send, 413, {"error": f"body over {MAX_BODY} bytes"})
                return
            if not msg.get("more_body"):
                break
        why = self._check_auth(scope, body)
        if why:
            await _reply(send, 401, {"error": why})
            return
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            await _reply(send, 400, {"error": f"bad JSON: {exc}"})
            return
        engine = scope["app"].state.engine_client
        op = scope["path"][len(PREFIX):]
        try:
            if op == "params":
                out = await self._rpc(engine, "tf_weights_params")
            elif op == "join":
                out = await self._rpc(engine, "tf_weights_join", json.dumps(req["config"]))
            elif op == "state":
                out = await self._rpc(engine, "tf_weights_state")
            elif op == "switch":
                out = await self._switch(engine, int(req["version"]), float(req.get("drain_s", 60.0)))
            else:
                await _reply(send, 404, {"error": f"no route {scope['path']}"})
                return
        except _Busy as exc:
            await _reply(send, 409, {"error": str(exc), "version": self.version})
            return
        except Exception as exc:  # the worker's error, as text: the caller decides
            await _reply(send, 409, {"error": f"{type(exc).__name__}: {exc}", "version": self.version})
            return
        if isinstance(out, dict):
            out = {**out, "version": self.version}
        await _reply(send, 200, out)

    def _check_auth(self, scope: dict[str, Any], body: bytes) -> str:
        if not self._key:
            return "this server has no TENSORFABRIC_SECRET: weight control is off"
        raw = dict(scope.get("headers", [])).get(AUTH_HEADER.encode(), b"").decode(errors="replace")
        parts = raw.split(":")
        if len(parts) != 3 or len(parts[1]) > 64:
            return f"missing or malformed {AUTH_HEADER}"
        ts, nonce, mac = parts
        try:
            age = abs(time.time() - float(ts))
        except ValueError:
            return f"malformed {AUTH_HEADER}"
        if age > MAX_SKEW_S:
            return "stale request (clocks more than 120 s apart?)"
        if not hmac.compare_digest(mac, _mac(self._key, ts, nonce, scope["path"], body)):
            return "bad MAC: wrong secret"
        now = time.monotonic()
        while self._nonces and next(iter(self._nonces.values())) < now - 2 * MAX_SKEW_S:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            return "replayed request"
        if len(self._nonces) >= _MAX_NONCES:
            self._nonces.popitem(last=False)
        self._nonces[nonce] = now
        return ""

    @staticmethod
    async def _rpc(engine: Any, method: str, *args: str) -> Any:
        results = await engine.collective_rpc(method, timeout=300.0, args=args)
        return results[0] if isinstance(results, list) and len(results) == 1 else results

    async def _switch(self, engine: Any, version: int, drain_s: float) -> Any:
        async with self._switching:
            if version == self.version:
                return await self._rpc(engine, "tf_weights_state")
            self._open.clear()
            try:
                deadline = time.monotonic() + drain_s
                while self._running:
                    try:
                        await asyncio.wait_for(self._drained.wait(),
                                               max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise _Busy(await self._stuck(engine, drain_s)) from None
                out = await self._rpc(engine, "tf_weights_switch", str(version))
                await engine.reset_prefix_cache()
                self.version = int(out.get("serving", version)) if isinstance(out, dict) else version
                return out
            finally:
                self._open.set()

    async def _stuck(self, engine: Any, drain_s: float) -> str:
        """Why a drain ran out: how many requests still run, the oldest's path and age, and
        whether the engine still answers a state RPC (an engine stuck in a step does not)."""
        now = time.monotonic()
        start, path = min(self._running.values())
        try:
            await asyncio.wait_for(self._rpc(engine, "tf_weights_state"), _PROBE_S)
            engine_said = f"the engine answers a state RPC in {time.monotonic() - now:.2f} s"
        except asyncio.TimeoutError:
            engine_said = f"the engine did not answer a state RPC in {_PROBE_S:.0f} s"
        except Exception as exc:  # noqa: BLE001 - reported, the switch fails either way
            engine_said = f"the engine's state RPC failed: {type(exc).__name__}: {exc}"
        return (f"{len(self._running)} request(s) still running after {drain_s:.0f} s (the "
                f"oldest, {path}, for {now - start:.1f} s; {engine_said}); still serving "
                f"{self.version}")


class _Busy(Exception):
    pass


async def _reply(send: Any, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
