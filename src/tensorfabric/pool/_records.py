"""Verification records: the verdicts, their expiry, retries with backoff, and draining.

A record belongs to a node's *key*: the join id ``pool join`` gives it (stable when the node
rejoins after a head restart) or else Ray's node id. It holds the verdict, the reason, the
score, when it was measured and when it expires, how many attempts it took, and a short
history. A node rejoining under a new Ray node id with the same key and the same claims keeps
its record (marked ``carried_over``) and is re-checked at once in the background.

Retries: a check that times out or fails on something the load can explain (the node was
unreachable, the link measured slow) is retried with backoff. Only the first attempt uses a
caller's short timeout; retries get at least the load-aware default. Claims that no load
explains (memory, GPU model) fail at once.

This module needs no Ray: the scale benchmark drives it with simulated nodes.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Callable

from . import _labels as L
from ._compile import NodeView
from ._verify import judge

VERIFY_TIMEOUT_S = 60.0  # per attempt on an idle head; scaled by load (load_factor)
VERIFY_ATTEMPTS = 3
VERIFY_BACKOFF_S = 1.0  # 1 s, 2 s, 4 s ... between attempts
VERIFY_BACKOFF_MAX_S = 30.0
VERIFY_TTL_S = 3600.0  # a verdict is re-checked before it is this old (io.net: hourly)
HISTORY = 8
# Reasons no amount of retrying changes (the hardware is what it is).
DEFINITIVE = ("of GPU memory, measured", "but no CUDA device", "but the device is",
              "memory probe read back wrong")  # fmt: skip

Measure = Callable[[NodeView, float], "tuple[dict[str, Any], str | None]"]


def node_key(view: NodeView) -> str:
    return view.labels.get(L.JOIN_ID) or view.node_id


def claims_sig(labels: dict[str, str]) -> str:
    items = sorted((k, v) for k, v in labels.items() if k.startswith(L.PREFIX) and k != L.JOIN_ID)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def load_factor(inflight: int = 1) -> float:
    """How much longer than on an idle machine a check may take: head load per CPU, and
    checks running at once beyond four, each at least 1."""
    try:
        per_cpu = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        per_cpu = 1.0
    return max(1.0, per_cpu) * max(1.0, inflight / 4)


class VerificationBook:
    """The records, keyed by node key. Thread-safe; the controller persists :meth:`dump`."""

    def __init__(self, ttl_s: float = VERIFY_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.RLock()
        self._recs: dict[str, dict[str, Any]] = {}
        self._inflight = 0
        self.on_change: Callable[[str, dict[str, Any]], None] = lambda key, rec: None

    # -------------------------------------------------------------- reading
    def annotate(self, views: list[NodeView], now: float | None = None) -> list[NodeView]:
        """Fill ``verified``, ``score``, ``verify_reason`` and ``drained`` of each view."""
        now = time.time() if now is None else now
        changed = []
        with self._lock:
            for v in views:
                rec = self._recs.get(node_key(v))
                if rec is None:
                    continue
                if rec["node_id"] != v.node_id and v.alive:
                    self._rebind(rec, v)
                    changed.append(dict(rec))
                if rec["node_id"] != v.node_id:
                    continue
                fresh = rec["expires"] > now
                v.verified = bool(rec["verified"]) and fresh and not rec.get("drained")
                v.score = float(rec["score"])
                v.drained = bool(rec.get("drained"))
                v.verify_reason = rec["reason"] if fresh else f"verdict expired ({rec['reason']})"
        for rec in changed:
            self.on_change(rec["key"], rec)
        return views

    def _rebind(self, rec: dict[str, Any], v: NodeView) -> None:
        """The node rejoined under a new Ray id: keep its record if its claims are the same."""
        if rec.get("claims") != claims_sig(v.labels):
            rec.update(verified=False, reason="rejoined with different claims; not verified yet",
                       node_id=v.node_id, expires=0.0)  # fmt: skip
            return
        rec.update(node_id=v.node_id, carried_over=True, recheck=True)

    def get(self, view: NodeView) -> dict[str, Any] | None:
        with self._lock:
            rec = self._recs.get(node_key(view))
            return dict(rec) if rec and rec["node_id"] == view.node_id else None

    def due(self, views: list[NodeView], now: float | None = None) -> list[NodeView]:
        """Alive pool nodes that need a check: none yet, expiring within 10 % of the TTL,
        carried over from a rejoin, or asked for again."""
        now = time.time() if now is None else now
        out = []
        with self._lock:
            for v in views:
                if not v.alive or v.is_head or v.claims is None:
                    continue
                rec = self._recs.get(node_key(v))
                if (rec is None or rec["node_id"] != v.node_id or rec.get("recheck")
                        or rec["expires"] - now < 0.1 * self.ttl_s):  # fmt: skip
                    out.append(v)
        return out

    # -------------------------------------------------------------- checking
    def verify(self, view: NodeView, measure: Measure, timeout: float | None = None,
               attempts: int = VERIFY_ATTEMPTS, sleep: Callable[[float], None] = time.sleep,
               ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Check ``view`` (retrying); store the record. Returns (record, newly failed), where
        *newly failed* means it was verified before and is not now: the caller drains it."""
        claims = view.claims
        assert claims is not None, "verify only pool nodes"
        tries: list[dict[str, Any]] = []
        with self._lock:
            self._inflight += 1
        try:
            for i in range(max(1, attempts)):
                default = VERIFY_TIMEOUT_S * load_factor(self._inflight)
                t = (timeout or default) if i == 0 else max((timeout or default) * 2**i, default)
                measured, sha = measure(view, t)
                ok, reason = judge(claims, measured, sha)
                tries.append({"time": time.time(), "ok": ok, "reason": reason,
                              "timeout_s": round(t, 3)})  # fmt: skip
                if ok or any(d in reason for d in DEFINITIVE) or i == attempts - 1:
                    break
                sleep(min(VERIFY_BACKOFF_S * 2**i, VERIFY_BACKOFF_MAX_S))
        finally:
            with self._lock:
                self._inflight -= 1
        return self._record(view, measured, ok, reason, tries)

    def _record(self, view: NodeView, measured: dict[str, Any], ok: bool, reason: str,
                tries: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:  # fmt: skip
        now = time.time()
        key = node_key(view)
        with self._lock:
            old = self._recs.get(key)
            was_ok = bool(old and old["node_id"] == view.node_id and old["verified"]
                          and not old.get("drained"))  # fmt: skip
            history = (old.get("history", []) if old else []) + tries
            if len(tries) > 1:
                reason = f"{reason} (after {len(tries)} attempts)" if ok else reason
            rec = {
                "key": key, "node_id": view.node_id, "claims": claims_sig(view.labels),
                "verified": ok, "reason": reason, "score": round(measured.get("gflops", 0.0), 1),
                "measured": {k: v for k, v in measured.items() if k != "sha256"},
                "time": now, "expires": now + self.ttl_s, "attempts": len(tries),
                "drained": bool(was_ok and not ok) or bool(old and old.get("drained") and not ok),
                "history": history[-HISTORY:],
            }  # fmt: skip
            if rec["drained"]:
                rec["reason"] = f"drained: {reason}"
            self._recs[key] = rec
        self.on_change(key, dict(rec))
        return dict(rec), was_ok and not ok

    def forget(self, key: str) -> None:
        with self._lock:
            self._recs.pop(key, None)

    def put(self, rec: dict[str, Any]) -> None:
        """Store a record as is (restoring state, or the benchmark's simulated verdicts)."""
        with self._lock:
            self._recs[rec["key"]] = dict(rec)

    # ----------------------------------------------------------- persistence
    def dump(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._recs.values()]

    def load(self, recs: Any) -> None:
        with self._lock:
            for r in recs:
                if isinstance(r, dict) and {"key", "node_id", "verified", "expires"} <= set(r):
                    r.setdefault("reason", "")
                    r.setdefault("score", 0.0)
                    self._recs[r["key"]] = r

    def __len__(self) -> int:
        return len(self._recs)
