"""OpenAI request parsing and response shapes (chat and legacy completions), no web framework.

Every problem with a request raises :class:`ApiError` carrying the HTTP status and OpenAI's
error object (``message``, ``type``, ``param``, ``code``), so no bad input becomes a 500.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..split._edge import ChatRequest, Done

__all__ = ["ApiError", "parse_chat", "parse_completion"]

_SEED_MAX = 2**63 - 1


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = "invalid_request"
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _content(m: dict[str, Any]) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    raise bad("message content must be a string or a list of text parts", "messages")


def _model(body: dict[str, Any], models: dict[str, str | None]) -> str:
    model = body.get("model") or next(iter(models))
    if not isinstance(model, str) or model not in models:
        raise ApiError(404, f"The model {model!r} does not exist; available: {sorted(models)}",
                       param="model", code="model_not_found")  # fmt: skip
    return model


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"{name} must be a number", name)
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _common(body: Any, header_route: str | None, models: dict[str, str | None]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = _model(body, models)
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = 128
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 8192:
        raise bad("max_tokens must be an integer in 1..8192", "max_tokens")
    explicit = models[model]
    if header_route:
        if header_route not in ("edge", "cloud", "auto"):
            raise bad("x-tensorfabric-route must be edge, cloud or auto")
        explicit = None if header_route == "auto" else header_route
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _SEED_MAX):
        raise bad(f"seed must be an integer in 0..{_SEED_MAX}", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise bad("stop must be a string or a list of up to 4 strings", "stop")
    if any(not s or len(s) > 256 for s in stops):
        raise bad("each stop string must be 1..256 characters", "stop")
    return {
        "model": model, "max_tokens": max_tokens, "explicit": explicit, "seed": seed, "stop": stops,
        "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "stream": bool(body.get("stream")),
    }  # fmt: skip


def _refuse_logprobs(body: dict[str, Any]) -> None:
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs are not supported by this server yet; leave logprobs and "
                  "top_logprobs unset", "logprobs", code="unsupported_parameter")  # fmt: skip


def parse_chat(body: Any, header_route: str | None, models: dict[str, str | None]) -> tuple[ChatRequest, str]:
    c = _common(body, header_route, models)
    _refuse_logprobs(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise bad("each message needs a role of system, user, assistant or developer", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _content(m)})
    req = ChatRequest(messages, c["max_tokens"], c["temperature"], c["top_p"], c["seed"], c["stream"],
                      c["explicit"], c["stop"])  # fmt: skip
    return req, c["model"]


def parse_completion(body: Any, header_route: str | None, models: dict[str, str | None]) -> tuple[ChatRequest, str]:
    """Legacy ``/v1/completions``: the prompt is sent as one user message (the tiers serve an
    instruct model through its chat template)."""
    c = _common(body, header_route, models)
    _refuse_logprobs(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string (one prompt per request)", "prompt")
    for name in ("suffix", "echo", "best_of"):
        if body.get(name) not in (None, False, 1):
            raise bad(f"{name} is not supported by this server", name, code="unsupported_parameter")
    req = ChatRequest([{"role": "user", "content": prompt}], c["max_tokens"], c["temperature"],
                      c["top_p"], c["seed"], c["stream"], c["explicit"], c["stop"])  # fmt: skip
    return req, c["model"]


def tf_field(done: Done) -> dict[str, Any]:
    return {
        "tier": done.tier, "reason": done.reason, "degraded": done.degraded,
        "confidence": done.confidence, "pii_replaced": done.pii, "cloud_error": done.cloud_error,
    }  # fmt: skip


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}  # fmt: skip


def completion(cid: str, model: str, text: str, done: Done, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": cid, "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(done),
        "tensorfabric": tf_field(done),
    }  # fmt: skip


def chunk(cid: str, model: str, text: str | None, finish: str | None, chat: bool,
          done: Done | None = None, role: bool = False) -> bytes:  # fmt: skip
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    obj: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice],
    }  # fmt: skip
    if done is not None:  # the final chunk alone says who answered
        obj["tensorfabric"] = tf_field(done)
        obj["usage"] = usage(done)
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
