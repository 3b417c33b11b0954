"""Durable controller state: Ray's internal KV plus a journal file the head reloads.

The controller's memory is a set of items: one verification record per node (``rec``) and
one entry per deployment with its replicas (``dep``). Each change writes only the item that
changed, to two places:

- **Ray's internal KV** (in the GCS), one key per item. It survives a restart of the
  controller actor, and a restart of the head too when the GCS is made fault tolerant with an
  external Redis (``RAY_REDIS_ADDRESS``, as Ray documents).
- **A journal file on the head** (``pool up --state-dir``): one JSON line per change,
  appended and flushed, so it survives the controller's or the head's processes being killed.
  When the journal holds many stale lines it is compacted into a snapshot written atomically
  (temporary file, ``fsync``, ``rename``). A plain Ray head keeps its GCS in memory, so after
  a head restart only this file remembers the pool.

Each item carries a sequence number; on start the controller loads whichever copy has seen
the later change. JSON only: readable with ``jq``, and no pickle from a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from ._errors import PoolError

KV_NAMESPACE = "tensorfabric-pool"
KV_PREFIX = "state/"
VERSION = 2
MAX_STATE_BYTES = 256 * 2**20  # refuse to load a state file larger than this
KINDS = ("rec", "dep")


def default_state_file(port: int, state_dir: str | None = None) -> str:
    """The state file ``pool up`` uses: one per head port, under ``~/.tensorfabric/pool``."""
    base = Path(state_dir) if state_dir else Path.home() / ".tensorfabric" / "pool"
    return str(base / f"state-{port}.jsonl")


def default_gcs_dir(port: int, state_dir: str | None = None) -> str:
    """Where ``pool up`` has Ray keep its own cluster state (RocksDB) for the head on ``port``."""
    base = Path(state_dir) if state_dir else Path.home() / ".tensorfabric" / "pool"
    return str(base / f"ray-gcs-{port}")


class StateStore:
    """Items by (kind, id) in Ray's internal KV and, if ``path`` is given, a journal file.

    ``use_kv=False`` keeps only the file (the scale benchmark runs without Ray). Thread-safe.
    A write that fails is reported by :attr:`last_error`, never raised into the controller's
    work: losing durability must not stop failover."""

    def __init__(self, path: str | None = None, *, use_kv: bool = True, compact_min: int = 1000) -> None:
        self.path = Path(path) if path else None
        self.use_kv = use_kv
        self.compact_min = compact_min
        self.last_error = ""
        self.writes = 0
        self.bytes_written = 0
        self._lock = threading.Lock()
        self._seq = 0
        self._live: dict[tuple[str, str], dict[str, Any]] = {}  # what a compaction writes
        self._journal_lines = 0
        self._journal: Any = None

    # --------------------------------------------------------------- writing
    def put(self, kind: str, item_id: str, value: dict[str, Any] | None) -> None:
        """Store ``value`` for (kind, id); ``None`` deletes it."""
        with self._lock:
            self._seq += 1
            item = None if value is None else {**value, "_seq": self._seq}
            if item is None:
                self._live.pop((kind, item_id), None)
            else:
                self._live[(kind, item_id)] = item
            errors = []
            if self.use_kv:
                try:
                    self._kv_put(kind, item_id, item)
                except Exception as exc:  # the GCS may be restarting
                    errors.append(f"internal KV: {type(exc).__name__}: {exc}")
            if self.path is not None:
                try:
                    self._append({"k": kind, "id": item_id, "v": item, "seq": self._seq})
                except OSError as exc:
                    errors.append(f"{self.path}: {exc}")
            self.last_error = "; ".join(errors)
            self.writes += 1

    def _kv_put(self, kind: str, item_id: str, item: dict[str, Any] | None) -> None:
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

        key = f"{KV_PREFIX}{kind}/{item_id}"
        if item is None:
            _internal_kv_del(key, namespace=KV_NAMESPACE)
        else:
            data = json.dumps(item, separators=(",", ":"), default=str).encode()
            _internal_kv_put(key, data, overwrite=True, namespace=KV_NAMESPACE)
            self.bytes_written += len(data)

    def _append(self, entry: dict[str, Any]) -> None:
        assert self.path is not None
        if self._journal is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._journal = open(self.path, "a", encoding="utf-8")
            os.chmod(self.path, 0o600)
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        self._journal.write(line)
        self._journal.flush()  # in the page cache: survives the process being killed
        self.bytes_written += len(line)
        self._journal_lines += 1
        if self._journal_lines > max(self.compact_min, 2 * len(self._live)):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal as one line per live item (atomically, fsynced)."""
        assert self.path is not None
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps({"version": VERSION, "seq": self._seq}) + "\n")
                for (kind, item_id), item in self._live.items():
                    f.write(json.dumps({"k": kind, "id": item_id, "v": item, "seq": item["_seq"]},
                                       separators=(",", ":"), default=str) + "\n")  # fmt: skip
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self._journal is not None:
            self._journal.close()
        self._journal = open(self.path, "a", encoding="utf-8")
        self._journal_lines = len(self._live)

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    # --------------------------------------------------------------- reading
    def load(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{kind: {id: item}}`` from the copy that saw the later change (empty if none)."""
        found = [s for s in (self._load_kv(), self._load_file()) if s is not None]
        if not found:
            return {k: {} for k in KINDS}
        items, seq = max(found, key=lambda s: s[1])
        with self._lock:
            self._seq = max(self._seq, seq)
            self._live = {(k, i): v for k in KINDS for i, v in items[k].items()}
        return items

    def _load_kv(self) -> tuple[dict[str, dict[str, Any]], int] | None:
        if not self.use_kv:
            return None
        try:
            from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

            keys = _internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE)
            items: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
            for key in keys:
                raw = _internal_kv_get(key, namespace=KV_NAMESPACE)
                kind, _, item_id = key.decode()[len(KV_PREFIX):].partition("/")
                if raw and kind in items:
                    items[kind][item_id] = _parse(raw, "Ray internal KV")
        except PoolError:
            raise
        except Exception:
            return None
        if not any(items.values()):
            return None
        return items, max(v.get("_seq", 0) for k in KINDS for v in items[k].values())

    def _load_file(self) -> tuple[dict[str, dict[str, Any]], int] | None:
        if self.path is None or not self.path.exists():
            return None
        size = self.path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise PoolError(f"pool state file {self.path} is {size} bytes (limit {MAX_STATE_BYTES})")
        items: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        seq = 0
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    if f.read(1) == "":  # a torn last line (killed mid-write): ignore it
                        break
                    raise PoolError(f"pool state file {self.path} line {n + 1} is not JSON; "
                                    "move the file away to start with an empty pool") from None  # fmt: skip
                if "version" in entry:
                    if entry["version"] != VERSION:
                        raise PoolError(f"pool state file {self.path} has format "
                                        f"{entry['version']}, want {VERSION}")  # fmt: skip
                    continue
                if entry.get("k") not in items:
                    continue
                seq = max(seq, int(entry.get("seq", 0)))
                if entry["v"] is None:
                    items[entry["k"]].pop(entry["id"], None)
                else:
                    items[entry["k"]][entry["id"]] = entry["v"]
        return items, seq


def _parse(raw: bytes, where: str) -> dict[str, Any]:
    try:
        item = json.loads(raw)
    except ValueError as exc:
        raise PoolError(f"pool state in {where} is not valid JSON ({exc})") from None
    if not isinstance(item, dict):
        raise PoolError(f"pool state in {where} has an unknown format")
    return item
