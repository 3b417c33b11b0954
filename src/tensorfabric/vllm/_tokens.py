"""Transfer grants: what a prefill instance hands out (through vLLM's ``kv_transfer_params``)
so that one decode instance may ask for one request's blocks, once, before a deadline."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any


def grant(key: bytes, req_id: str, blocks: list[int], expiry: float) -> str:
    body = json.dumps([req_id, list(map(int, blocks)), round(float(expiry), 3)],
                      separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def check(key: bytes, msg: dict[str, Any]) -> bool:
    try:
        want = grant(key, str(msg["req"]), list(msg["blocks"]), float(msg["expiry"]))
        return hmac.compare_digest(want, str(msg["token"]))
    except (KeyError, TypeError, ValueError):
        return False
