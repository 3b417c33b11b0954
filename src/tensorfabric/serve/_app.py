"""The OpenAI-compatible HTTP API in front of the edge tier (FastAPI, served by uvicorn).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain or ``stream: true``
server-sent events), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``GET /metrics`` (Prometheus text format).

Model ids: ``tensorfabric`` routes automatically; ``tensorfabric-edge`` and
``tensorfabric-cloud`` (or the header ``x-tensorfabric-route: edge|cloud``) are the user's
explicit choice. Every answer says where it was produced: the ``tensorfabric`` field of the
response (the final chunk when streaming; stream headers are sent before anyone answered, so
they name no tier) and, for plain responses, the ``x-tensorfabric-tier``, ``-route-reason`` and
``-degraded`` headers.

Errors use OpenAI's shape (``{"error": {message, type, param, code}}``), 404 and 405 included.
With ``server.api_key`` every ``/v1`` and ``/metrics`` request needs ``Authorization: Bearer
KEY``. Bodies over ``server.max_body_bytes`` get 413; a prompt that does not fit
``edge.max_context`` gets 400. At most ``server.max_queue`` requests are in flight; more get 429
with ``Retry-After``; a request whose tier stays busy past ``server.request_timeout`` gets 503.
No client request reaches a 500, and none counts against the cloud's health.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the HTTP server needs fastapi and uvicorn: pip install 'tensorfabric[serve]'") from exc

from ..split._edge import Done, EdgeTier, RouteInfo
from ..split._errors import CloudUnavailable, InvalidRequest, Overloaded, QueueFull
from ._metrics import ServeMetrics
from ._openai import ApiError, chunk, completion, parse_chat, parse_completion

__all__ = ["create_app"]

log = logging.getLogger("tensorfabric.serve")


def _error(e: ApiError, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _Guarded:
    """A sync generator driven from worker threads; ``close`` waits for a running ``next``."""

    def __init__(self, gen: Iterator[Any]) -> None:
        self.gen = gen
        self.lock = threading.Lock()

    def next(self) -> Any:
        with self.lock:
            return next(self.gen, StopIteration)

    def close(self) -> None:
        with self.lock:
            self.gen.close()  # type: ignore[attr-defined]


def _map_error(exc: BaseException) -> ApiError:
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded"
                        if "max_context" in str(exc) else "invalid_request")  # fmt: skip
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", "queue_full")
    if isinstance(exc, Overloaded):
        return ApiError(503, str(exc), "server_error", "overloaded")
    if isinstance(exc, CloudUnavailable):
        return ApiError(503, str(exc), "server_error", "unavailable")
    log.error("internal error while serving a request", exc_info=exc)
    return ApiError(503, f"internal error ({type(exc).__name__}); retry, and report it if it "
                    "persists", "server_error", "internal_error")  # fmt: skip


async def _read_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds server.max_body_bytes={limit}",
                       code="request_too_large")  # fmt: skip
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"request body exceeds server.max_body_bytes={limit}", code="request_too_large")
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def create_app(
    edge: EdgeTier, *, model_name: str = "tensorfabric", max_queue: int = 64,
    api_key: str | None = None, max_body_bytes: int = 1 << 20,
) -> Any:  # fmt: skip
    metrics = ServeMetrics()
    metrics.cloud_up.set(1 if edge.cloud_available else 0)
    if edge.health is not None:
        edge.health._on_change = lambda up: metrics.cloud_up.set(1 if up else 0)
    @contextlib.asynccontextmanager
    async def _lifespan(_app: Any) -> AsyncIterator[None]:
        import anyio.to_thread

        # one worker thread per queued request, so a full queue never starves the health route
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, max_queue + 16)
        yield

    app = FastAPI(title="tensorfabric", version="0.1.0", lifespan=_lifespan)
    app.state.edge, app.state.metrics = edge, metrics
    inflight = [0]
    models = {model_name: None, f"{model_name}-edge": "edge", f"{model_name}-cloud": "cloud"}
    created = int(time.time())

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if api_key and (path.startswith("/v1") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                       "<server.api_key>'", code="invalid_api_key"))  # fmt: skip
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a 500
            return _error(_map_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(ApiError(exc.status_code, message, code=code), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Any:
        return _error(ApiError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Any:
        metrics.rejected.labels(str(exc.status)).inc()
        return _error(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        up = edge.cloud_available
        return {
            "status": "ok" if up else "degraded",
            "edge": {"model": edge.model.name},
            "cloud": {"available": up, "last_error": edge.health.last_error if edge.health else "no cloud tier",
                      "tls": getattr(edge, "tls", False),
                      # the cloud's model as its last pong named it (e.g. "...-vllm-disagg")
                      "model": (edge.cloud.last_pong.get("model") if edge.cloud is not None else None)},
            "mode": edge.cfg.mode,
            "in_flight": inflight[0],
        }  # fmt: skip

    @app.get("/metrics")
    async def prom() -> Any:
        metrics.update_tiers(edge.tier_stats())
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    def _model_card(m: str) -> dict[str, Any]:
        return {"id": m, "object": "model", "created": created, "owned_by": "tensorfabric"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in models]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> Any:
        if model_id not in models:
            raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return _model_card(model_id)

    async def serve(request: Request, chat: bool) -> Any:
        body = await _read_body(request, max_body_bytes)
        parse = parse_chat if chat else parse_completion
        req, model = parse(body, request.headers.get("x-tensorfabric-route"), models)
        if inflight[0] >= max_queue:
            raise ApiError(429, f"server busy: {inflight[0]} requests in flight (server.max_queue="
                           f"{max_queue}); retry later", "rate_limit_error", "overloaded")  # fmt: skip
        inflight[0] += 1
        metrics.inflight.set(inflight[0])
        started = time.perf_counter()
        g = _Guarded(edge.chat(req))
        released = [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                inflight[0] -= 1
                metrics.inflight.set(inflight[0])

        try:
            route = await run_in_threadpool(g.next)
        except Exception as exc:
            release()
            await run_in_threadpool(g.close)
            e = _map_error(exc)
            metrics.rejected.labels(str(e.status)).inc()
            if isinstance(exc, QueueFull):
                log.info("refused (429): %s", exc)
                return _error(e, {"Retry-After": str(exc.retry_after)})
            return _error(e, {"Retry-After": "2"} if e.status == 503 else None)
        assert isinstance(route, RouteInfo)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if not req.stream:
            try:
                text, done = await run_in_threadpool(_collect, g)
            except Exception as exc:
                e = _map_error(exc)
                metrics.rejected.labels(str(e.status)).inc()
                return _error(e, {"Retry-After": "2"} if e.status == 503 else None)
            finally:
                release()
                await run_in_threadpool(g.close)  # runs the generator's cleanup (model lock)
            _log_request(done, time.perf_counter() - started, None)
            metrics.record(done, time.perf_counter() - started)
            headers = {
                "x-tensorfabric-tier": done.tier, "x-tensorfabric-route-reason": done.reason,
                "x-tensorfabric-degraded": str(done.degraded).lower(),
            }  # fmt: skip
            return JSONResponse(completion(cid, model, text, done, chat), headers=headers)

        async def sse() -> AsyncIterator[bytes]:
            first = True
            ttft = None
            try:
                if chat:
                    yield chunk(cid, model, None, None, chat, role=True)
                while True:
                    ev = await run_in_threadpool(g.next)
                    if ev is StopIteration:
                        break
                    if isinstance(ev, str):
                        if first:
                            ttft = time.perf_counter() - started
                            metrics.ttft.labels(route.decision.tier).observe(ttft)
                            first = False
                        yield chunk(cid, model, ev, None, chat)
                    elif isinstance(ev, Done):
                        _log_request(ev, time.perf_counter() - started, ttft)
                        metrics.record(ev, time.perf_counter() - started)
                        yield chunk(cid, model, None if chat else "", ev.finish_reason, chat, done=ev)
                yield b"data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - headers are gone: say it in the stream
                yield f"data: {json.dumps(_map_error(exc).body())}\n\n".encode()
            finally:
                release()
                # Not awaited: this also runs when the client went away and the task is being
                # cancelled. The close waits for a next() still running in a worker thread,
                # then the generator's cleanup releases the model and cancels cloud work.
                threading.Thread(target=g.close, name="tf-close-stream", daemon=True).start()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await serve(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await serve(request, chat=False)

    return app


def _log_request(done: Done, seconds: float, ttft: float | None) -> None:
    """One line per answered request: who answered, why, and how long it took."""
    log.info("request tier=%s reason=%s degraded=%s prompt_tokens=%d completion_tokens=%d "
             "latency=%.3fs ttft=%s", done.tier, done.reason, str(done.degraded).lower(),
             done.prompt_tokens, done.completion_tokens, seconds,
             "-" if ttft is None else f"{ttft:.3f}s")  # fmt: skip


def _collect(g: _Guarded) -> tuple[str, Done]:
    parts: list[str] = []
    while True:
        ev = g.next()
        if ev is StopIteration:
            raise CloudUnavailable("the request ended without an answer")
        if isinstance(ev, str):
            parts.append(ev)
        elif isinstance(ev, Done):
            return "".join(parts), ev
