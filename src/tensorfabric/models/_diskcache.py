"""The on-disk cache of converted models: one entry per source file, one conversion at a time.

A GGUF checkpoint is converted once (dequantized and written as a Hugging Face folder); the
entry's name carries a digest of the source file's path, size and modification time and the
dtype, and a ``tensorfabric-cache.json`` manifest inside says where it came from. Conversions
of one source hold a file lock (``<entry prefix>.lock``), so a second process that needs the
same model waits for the first and reads its result instead of converting it again; after a
conversion, older entries of the same source are removed. No torch needed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ModelLoadError

#: Bump when what is written changes: entries of older code are removed, not reused.
CACHE_FORMAT = 3
MANIFEST = "tensorfabric-cache.json"
#: How long a process waits for another one's conversion before giving up.
LOCK_TIMEOUT_S = 1800.0

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$TENSORFABRIC_CACHE_DIR/models`` if set, else ``~/.cache/tensorfabric/models``."""
    root = os.environ.get("TENSORFABRIC_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "tensorfabric"
    return base / "models"


@dataclass(frozen=True)
class CacheEntry:
    """One converted model on disk: its folder, size in bytes and the manifest's fields.

    ``source`` is the file it was converted from (``None`` for entries written by older
    versions, which carry no manifest); ``stale`` says the entry will not be reused (its
    source changed or is gone, or its format is old) and :func:`prune_cache` removes it.
    """

    path: Path
    size_bytes: int
    source: str | None
    dtype: str | None
    created: float | None
    convert_seconds: float | None
    transformers: str | None
    stale: bool

    @property
    def name(self) -> str:
        return self.path.name


def entry_prefix(source: Path, dtype_name: str) -> str:
    """``<stem>-<dtype>-<hash of the source path>``: every entry of one source starts so."""
    where = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return f"{source.stem}-{dtype_name}-{where}"


def entry_path(source: Path, dtype_name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the conversion of ``source`` (as it is now on disk) to ``dtype_name`` lives."""
    stat = source.stat()
    ident = f"{CACHE_FORMAT}|{source}|{stat.st_size}|{stat.st_mtime_ns}|{dtype_name}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{entry_prefix(source, dtype_name)}-{digest}"


def writable(folder: Path) -> bool:
    """Whether entries (and their lock files) can be written under ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


@contextlib.contextmanager
def conversion_lock(entry: Path, progress: Progress, what: str,
                    timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the lock that serializes conversions of ``entry``'s source (one per prefix).

    When another process holds it, say so through ``progress`` and wait up to ``timeout``
    seconds, then raise :class:`ModelLoadError` naming the lock file and its holder.
    """
    try:
        from filelock import FileLock, Timeout
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the model cache needs filelock: pip install 'tensorfabric[llm]'") from exc
    lock_path = _lock_path(entry)
    owner = lock_path.with_name(lock_path.name + ".owner")
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read_owner(owner)
        progress(f"waiting for {holder} converting {what} (it writes {entry.parent}); "
                 "this process reuses its result")
        started = time.monotonic()
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise ModelLoadError(
                f"gave up after {timeout:.0f} s waiting for {holder} to convert {what}: if no "
                f"such process runs, delete {lock_path}", path=str(entry)) from None
        progress(f"the other conversion finished after {time.monotonic() - started:.0f} s")
    try:
        with contextlib.suppress(OSError):
            owner.write_text(json.dumps({"pid": os.getpid(), "since": time.time()}))
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _lock_path(entry: Path) -> Path:
    """The lock of every entry of one source (a temporary folder maps to its entry's lock)."""
    return entry.parent / (entry.name.split(".tmp-")[0].rsplit("-", 1)[0] + ".lock")


def _read_owner(owner: Path) -> str:
    try:
        pid = int(json.loads(owner.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
    return f"process {pid}"


def write_entry(target: Path, save: Callable[[Path], None], manifest: dict[str, Any]) -> bool:
    """Write an entry atomically: ``save(tmp)`` into a temporary sibling, add the manifest, then
    rename. A damaged entry already at ``target`` is replaced. Returns False (and leaves
    nothing behind) when the cache is not writable: a cache only saves time."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError:
        return False
    try:
        save(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        return True
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_older_entries(target: Path) -> list[Path]:
    """Remove the other entries of ``target``'s source (older source file, older format), and
    leftovers of interrupted conversions; call with the conversion lock held."""
    prefix = target.name.rsplit("-", 1)[0] + "-"
    removed = []
    for path in sorted(target.parent.glob(prefix + "*")):
        if path == target or not path.is_dir():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    # entries of the version before manifests existed: <stem>-<dtype>-<16 hex>, same source
    stem_dtype = prefix.rsplit("-", 2)[0] + "-"
    for path in sorted(target.parent.glob(stem_dtype + "*")):
        rest = path.name[len(stem_dtype):]
        if path.is_dir() and len(rest) == 16 and not (path / MANIFEST).exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def list_cache(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Every entry in the cache directory, oldest first."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not root.is_dir():
        return []
    entries = [_entry(p) for p in root.iterdir() if p.is_dir()]
    return sorted(entries, key=lambda e: (e.created or 0.0, e.name))


def _entry(path: Path) -> CacheEntry:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    try:
        meta = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        meta = {}
    source = meta.get("source")
    stale = ".tmp-" in path.name or meta.get("format") != CACHE_FORMAT or not source
    if not stale:
        try:
            stale = entry_path(Path(source), str(meta.get("dtype")), path.parent) != path
        except OSError:
            stale = True  # the source file is gone
    return CacheEntry(path=path, size_bytes=size, source=source, dtype=meta.get("dtype"),
                      created=meta.get("created") or path.stat().st_mtime, convert_seconds=meta.get("convert_seconds"),
                      transformers=meta.get("transformers"), stale=stale)


def prune_cache(cache_dir: str | Path | None = None, *, everything: bool = False
                ) -> list[CacheEntry]:
    """Remove stale entries (or every entry with ``everything=True``); returns what went.

    An entry being converted right now is skipped (its conversion lock is held)."""
    try:
        from filelock import FileLock, Timeout
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the model cache needs filelock: pip install 'tensorfabric[llm]'") from exc
    removed = []
    for entry in list_cache(cache_dir):
        if not (everything or entry.stale):
            continue
        lock = FileLock(str(_lock_path(entry.path)))
        try:
            with lock.acquire(timeout=0):
                shutil.rmtree(entry.path, ignore_errors=True)
        except Timeout:
            continue
        removed.append(entry)
    return removed
