"""The OpenAI-compatible HTTP API in front of the edge tier (FastAPI, served by uvicorn).

Routes: ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Model ids: ``tensorfabric`` routes automatically; ``tensorfabric-edge`` and
``tensorfabric-cloud`` (or the header ``x-tensorfabric-route: edge|cloud``) are the user's
explicit choice. Every answer says where it was produced: the ``tensorfabric`` field of the
response (last chunk when streaming) and the ``x-tensorfabric-tier``, ``-route-reason`` and
``-degraded`` headers.

Admission: at most ``server.max_queue`` requests are in flight; more get 429 with
``Retry-After``. A request whose tier stays busy past ``server.request_timeout`` gets 503.
"""

from __future__ import annotations

import json
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
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the HTTP server needs fastapi and uvicorn: pip install 'tensorfabric[serve]'") from exc

from ..split._edge import ChatRequest, Done, EdgeTier, RouteInfo
from ..split._errors import CloudUnavailable, Overloaded
from ._metrics import ServeMetrics

__all__ = ["create_app"]


def _error(status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "code": code, "param": None}},
        status_code=status, headers=headers,
    )  # fmt: skip


def _content(m: dict[str, Any]) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError("message content must be a string or a list of text parts")


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


def create_app(edge: EdgeTier, *, model_name: str = "tensorfabric", max_queue: int = 64) -> Any:
    metrics = ServeMetrics()
    metrics.cloud_up.set(1 if edge.cloud_available else 0)
    if edge.health is not None:
        edge.health._on_change = lambda up: metrics.cloud_up.set(1 if up else 0)
    app = FastAPI(title="tensorfabric", version="0.1.0")
    app.state.edge, app.state.metrics = edge, metrics
    inflight = [0]
    models = {model_name: None, f"{model_name}-edge": "edge", f"{model_name}-cloud": "cloud"}

    @app.on_event("startup")
    async def _threads() -> None:
        import anyio.to_thread

        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, max_queue + 16)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Any:
        return _error(400, f"invalid request: {exc.errors()}", "invalid_request_error", "invalid_request")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        up = edge.cloud_available
        return {
            "status": "ok" if up else "degraded",
            "edge": {"model": edge.model.name},
            "cloud": {"available": up, "last_error": edge.health.last_error if edge.health else "no cloud tier"},
            "mode": edge.cfg.mode,
            "in_flight": inflight[0],
        }

    @app.get("/metrics")
    async def prom() -> Any:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "tensorfabric"} for m in models
        ]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            body = await request.json()
            req, model = _parse(body, request.headers.get("x-tensorfabric-route"), models)
        except (ValueError, TypeError, KeyError) as exc:
            metrics.rejected.labels("400").inc()
            return _error(400, str(exc), "invalid_request_error", "invalid_request")
        if inflight[0] >= max_queue:
            metrics.rejected.labels("429").inc()
            return _error(429, f"server busy: {inflight[0]} requests in flight (server.max_queue="
                          f"{max_queue}); retry later", "rate_limit_error", "overloaded",
                          {"Retry-After": "1"})  # fmt: skip
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
        except Overloaded as exc:
            release()
            metrics.rejected.labels("503").inc()
            return _error(503, str(exc), "server_error", "overloaded", {"Retry-After": "2"})
        except Exception:
            release()
            raise
        assert isinstance(route, RouteInfo)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        headers = {
            "x-tensorfabric-tier": route.decision.tier,
            "x-tensorfabric-route-reason": route.decision.reason,
            "x-tensorfabric-degraded": str(route.degraded).lower(),
        }
        if not req.stream:
            try:
                text, done = await run_in_threadpool(_collect, g)
            except (Overloaded, CloudUnavailable) as exc:
                metrics.rejected.labels("503").inc()
                return _error(503, str(exc), "server_error", "unavailable", {"Retry-After": "2"})
            finally:
                release()
                await run_in_threadpool(g.close)  # runs the generator's cleanup (model lock)
            metrics.record(done, time.perf_counter() - started)
            headers.update({
                "x-tensorfabric-tier": done.tier, "x-tensorfabric-route-reason": done.reason,
                "x-tensorfabric-degraded": str(done.degraded).lower(),
            })  # fmt: skip
            return JSONResponse(_completion(cid, model, text, done), headers=headers)

        async def sse() -> AsyncIterator[bytes]:
            first = True
            try:
                yield _chunk(cid, model, {"role": "assistant", "content": ""}, None)
                while True:
                    ev = await run_in_threadpool(g.next)
                    if ev is StopIteration:
                        break
                    if isinstance(ev, str):
                        if first:
                            metrics.ttft.labels(route.decision.tier).observe(time.perf_counter() - started)
                            first = False
                        yield _chunk(cid, model, {"content": ev}, None)
                    elif isinstance(ev, Done):
                        metrics.record(ev, time.perf_counter() - started)
                        yield _chunk(cid, model, {}, ev.finish_reason, _tf_field(ev), _usage(ev))
                yield b"data: [DONE]\n\n"
            except (Overloaded, CloudUnavailable) as exc:
                err = {"error": {"message": str(exc), "type": "server_error", "code": "unavailable"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                release()
                # Not awaited: this also runs when the client went away and the task is being
                # cancelled. The close waits for a next() still running in a worker thread,
                # then the generator's cleanup releases the model and cancels cloud work.
                threading.Thread(target=g.close, name="tf-close-stream", daemon=True).start()

        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    return app


def _parse(body: Any, header_route: str | None, models: dict[str, str | None]) -> tuple[ChatRequest, str]:
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    model = body.get("model") or next(iter(models))
    if model not in models:
        raise ValueError(f"unknown model {model!r}; available: {sorted(models)}")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    messages = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError("each message needs a role of system, user, assistant or developer")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _content(m)})
    if body.get("n", 1) != 1:
        raise ValueError("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = 128
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 8192:
        raise ValueError("max_tokens must be an integer in 1..8192")
    explicit = models[model]
    if header_route:
        if header_route not in ("edge", "cloud", "auto"):
            raise ValueError("x-tensorfabric-route must be edge, cloud or auto")
        explicit = None if header_route == "auto" else header_route
    t, p = body.get("temperature"), body.get("top_p")
    temperature = 0.0 if t is None else float(t)
    top_p = 1.0 if p is None else float(p)
    if not 0.0 <= temperature <= 2.0 or not 0.0 < top_p <= 1.0:
        raise ValueError("temperature must be in [0, 2] and top_p in (0, 1]")
    seed = body.get("seed")
    return ChatRequest(messages, max_tokens, temperature, top_p, seed, bool(body.get("stream")), explicit), model


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


def _tf_field(done: Done) -> dict[str, Any]:
    return {
        "tier": done.tier, "reason": done.reason, "degraded": done.degraded,
        "confidence": done.confidence, "pii_replaced": done.pii, "cloud_error": done.cloud_error,
    }  # fmt: skip


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}  # fmt: skip


def _completion(cid: str, model: str, text: str, done: Done) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": done.finish_reason, "logprobs": None}],
        "usage": _usage(done), "tensorfabric": _tf_field(done),
    }  # fmt: skip


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None,
           tf: dict[str, Any] | None = None, usage: dict[str, int] | None = None) -> bytes:
    obj: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }  # fmt: skip
    if tf is not None:
        obj["tensorfabric"] = tf
    if usage is not None:
        obj["usage"] = usage
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
