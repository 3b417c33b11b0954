"""Durable controller state: Ray's internal KV plus a checkpoint file the head reloads.

The controller's memory (verification records, deployments, their replicas) is written after
every change to two places:

- **Ray's internal KV** (in the GCS). It survives a restart of the controller actor, and a
  restart of the head too when the GCS is made fault tolerant with an external Redis
  (``RAY_REDIS_ADDRESS``, as Ray documents).
- **A checkpoint file on the head** (``pool up --state-dir``), written atomically
  (temporary file, ``fsync``, ``rename``). A plain Ray head keeps its GCS in memory, so after
  a head restart only this file remembers the pool.

On start the controller loads whichever copy is newer. The state is JSON: small, readable
with ``jq``, and safe to load (no pickle from a file an attacker might have written).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ._errors import PoolError

KV_NAMESPACE = "tensorfabric-pool"
KV_KEY = "controller-state"
VERSION = 1
MAX_STATE_BYTES = 64 * 2**20  # refuse to load a checkpoint larger than this


def default_state_file(port: int, state_dir: str | None = None) -> str:
    """The checkpoint file ``pool up`` uses: one per head port, under ``~/.tensorfabric/pool``."""
    base = Path(state_dir) if state_dir else Path.home() / ".tensorfabric" / "pool"
    return str(base / f"state-{port}.json")


class StateStore:
    """Saves and loads the controller state (a JSON-able dict) to KV and, if given, a file.

    ``use_kv=False`` keeps only the file (and lets the scale benchmark run without Ray).
    Saving is thread-safe; a save that fails is reported by :attr:`last_error`, never raised
    into the controller's work (losing durability must not stop failover)."""

    def __init__(self, path: str | None = None, *, use_kv: bool = True) -> None:
        self.path = Path(path) if path else None
        self.use_kv = use_kv
        self.last_error = ""
        self.saves = 0
        self._lock = threading.Lock()

    def save(self, state: dict[str, Any]) -> None:
        data = json.dumps({"version": VERSION, "saved_at": time.time(), **state},
                          separators=(",", ":"), default=str).encode()  # fmt: skip
        with self._lock:
            errors = []
            if self.use_kv:
                try:
                    from ray.experimental.internal_kv import _internal_kv_put

                    _internal_kv_put(KV_KEY, data, overwrite=True, namespace=KV_NAMESPACE)
                except Exception as exc:  # the GCS may be restarting
                    errors.append(f"internal KV: {type(exc).__name__}: {exc}")
            if self.path is not None:
                try:
                    _atomic_write(self.path, data)
                except OSError as exc:
                    errors.append(f"{self.path}: {exc}")
            self.last_error = "; ".join(errors)
            self.saves += 1

    def load(self) -> dict[str, Any] | None:
        """The newer of the KV copy and the file, or ``None`` if neither exists."""
        found = [s for s in (self._load_kv(), self._load_file()) if s is not None]
        if not found:
            return None
        return max(found, key=lambda s: float(s.get("saved_at", 0)))

    def _load_kv(self) -> dict[str, Any] | None:
        if not self.use_kv:
            return None
        try:
            from ray.experimental.internal_kv import _internal_kv_get

            raw = _internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        except Exception:
            return None
        return _parse(raw, "Ray internal KV") if raw else None

    def _load_file(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        size = self.path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise PoolError(f"pool state file {self.path} is {size} bytes (limit {MAX_STATE_BYTES})")
        return _parse(self.path.read_bytes(), str(self.path))


def _parse(raw: bytes, where: str) -> dict[str, Any]:
    try:
        state = json.loads(raw)
    except ValueError as exc:
        raise PoolError(f"pool state in {where} is not valid JSON ({exc}); move it away to "
                        "start with an empty pool") from None  # fmt: skip
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise PoolError(f"pool state in {where} has an unknown format (want version {VERSION})")
    return state


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
