"""Run a decode worker and prefill workers as local processes, and talk to them.

:class:`KVClient` is what a router or API server holds: it sends requests to a decode worker
over the engine and returns futures. :class:`DisaggregatedCluster` starts the processes (each
with its own engine and model) on this machine and gives you a client; on several machines,
start ``python -m tensorfabric.kv._worker`` yourself with the decode worker's address.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets as _secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorfabric as tf

from ._config import WorkerConfig
from ._errors import KVCacheFullError, KVError, PrefillFailedError, WorkerUnavailableError
from ._protocol import TAG_CLIENT, TAG_DECODE, HandoffStats, decode_message, encode

_ERRORS: dict[str, type[KVError]] = {
    "prefill_failed": PrefillFailedError,
    "too_long": KVCacheFullError,
}


@dataclass
class DisaggResult:
    """A finished request: generated ``tokens`` (stop token excluded), their ``text``, and
    the handoff statistics."""

    tokens: list[int]
    text: str
    stopped: bool
    stats: HandoffStats = field(default_factory=HandoffStats)


class KVClient:
    """Submits requests to a decode worker. Thread-safe; results arrive on a background thread."""

    def __init__(self, decode_address: bytes, *, secret: str | bytes | None,
                 timeout: float = 30.0, name: str = "kv-client") -> None:
        self.decode_address = decode_address
        self.timeout = timeout
        self.engine = tf.Engine(secret, name=f"{name}-{os.getpid()}", timeout=timeout)
        self._ids = itertools.count(1)
        self._futures: dict[int, Future[Any]] = {}
        self._streams: dict[int, Callable[[int, str], None]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="kv-client-recv", daemon=True)
        self._thread.start()

    def submit(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64,
               prefill_worker: str | None = None, max_attempts: int | None = None,
               local: bool = False, prefill_timeout: float | None = None,
               fault_layer_delay_s: float = 0.0,
               measure_replay: bool = False,
               on_token: Callable[[int, str], None] | None = None) -> Future[DisaggResult]:
        """Queue a request. ``prompt`` is text (chat-templated by the decode worker) or token ids.

        ``local=True`` makes the decode worker prefill itself (the single-process baseline).
        ``prefill_worker`` pins the first attempt to one worker; ``prefill_timeout`` overrides
        the decode worker's deadline for one prefill attempt; ``fault_layer_delay_s`` makes
        the prefill worker pause after each layer's write (fault injection for tests);
        ``measure_replay`` makes it time the same writes again without compute
        (``stats.extra["replay_s"]``, for benchmarks). ``on_token(token, text)`` streams the
        answer: it runs (on the client's receive thread) for each token as the decode worker
        produces it, with the text that token adds; the future still gets the whole result.
        """
        cid = next(self._ids)
        fut: Future[DisaggResult] = Future()
        fields: dict[str, Any] = {"client_id": cid, "max_new_tokens": max_new_tokens,
                                  "prefill_worker": prefill_worker, "max_attempts": max_attempts,
                                  "local": local, "prefill_timeout": prefill_timeout,
                                  "fault_layer_delay_s": fault_layer_delay_s,
                                  "measure_replay": measure_replay,
                                  "stream": on_token is not None}
        if isinstance(prompt, str):
            fields["prompt"] = prompt
        else:
            fields["ids"] = [int(t) for t in prompt]
        with self._lock:
            self._futures[cid] = fut
            if on_token is not None:
                self._streams[cid] = on_token
        try:
            self.engine.send(self.decode_address, encode("request", **fields),
                             tag=TAG_DECODE).wait(self.timeout)
        except tf.TensorFabricError as exc:
            with self._lock:
                self._futures.pop(cid, None)
                self._streams.pop(cid, None)
            raise WorkerUnavailableError(f"cannot reach the decode worker: {exc}") from exc
        return fut

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **kwargs: Any) -> DisaggResult:
        """Submit and wait; raises :class:`PrefillFailedError` and friends on failure."""
        fut = self.submit(prompt, **kwargs)
        deadline = time.monotonic() + (timeout or 10 * self.timeout)
        while True:
            try:
                return fut.result(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except TimeoutError:
                pass
            if time.monotonic() >= deadline:
                raise tf.TransferTimeout("no answer from the decode worker in time; it may be "
                                         "overloaded (raise the timeout) or stuck")
            try:  # a dead decode worker fails this send at once
                self.engine.send(self.decode_address, encode("ping"), tag=TAG_DECODE).wait(
                    self.timeout)
            except tf.TensorFabricError as exc:
                raise WorkerUnavailableError(
                    f"the decode worker is gone ({type(exc).__name__}: {exc}); the request is "
                    "lost: restart the worker and retry") from exc

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The decode worker's counters: ``free_blocks``, ``num_blocks``, ``prefill_workers``."""
        cid = next(self._ids)
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            self._futures[cid] = fut
        self.engine.send(self.decode_address, encode("stats", client_id=cid),
                         tag=TAG_DECODE).wait(self.timeout)
        try:
            return fut.result(timeout=timeout or self.timeout)
        except TimeoutError:
            raise tf.TransferTimeout("the decode worker did not answer a stats query") from None

    def close(self) -> None:
        self._closed.set()
        self.engine.close()
        self._thread.join(timeout=5)
        with self._lock:
            pending, self._futures = list(self._futures.values()), {}
        for fut in pending:
            if not fut.done():
                fut.set_exception(WorkerUnavailableError("client closed"))

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                msg = decode_message(self.engine.recv(tag=TAG_CLIENT, timeout=0.5).data)
            except tf.TransferTimeout:
                continue
            except tf.TensorFabricError:
                return
            cid = int(msg.get("client_id", -1))
            if msg["type"] == "token":
                self._stream(cid, msg)
                continue
            with self._lock:
                fut = self._futures.pop(cid, None)
                self._streams.pop(cid, None)
            if fut is None:
                continue
            if msg["type"] == "stats":
                fut.set_result({k: v for k, v in msg.items() if k not in ("type", "client_id")})
            elif msg.get("ok"):
                fut.set_result(DisaggResult(msg["tokens"], msg["text"], msg["stopped"],
                                            HandoffStats.from_dict(msg["stats"])))
            else:
                cls = _ERRORS.get(msg.get("kind", ""), KVError)
                fut.set_exception(cls(msg["error"]))

    def _stream(self, cid: int, msg: dict[str, Any]) -> None:
        with self._lock:
            callback = self._streams.get(cid)
        if callback is None:
            return
        try:
            callback(int(msg["token"]), str(msg.get("text", "")))
        except Exception:  # a failing callback must not stop the receive thread
            logging.getLogger("tensorfabric.kv.client").exception("on_token callback failed")


class _Proc:
    def __init__(self, role: str, config: WorkerConfig, decode_address: bytes | None) -> None:
        env = dict(os.environ)
        root = str(Path(tf.__file__).resolve().parent.parent)  # this tensorfabric, in the child
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorfabric.kv._worker", role], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"config": config.to_dict(), "decode_address":
                                          decode_address.hex() if decode_address else None}) + "\n")
        self.proc.stdin.flush()
        self.info: dict[str, Any] = {}

    def ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the worker's hello line (the model load happens before it)."""
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            self.kill()
            raise WorkerUnavailableError(
                f"{self.role} worker did not start within {timeout:.0f} s "
                f"(exit code {self.proc.poll()}); see its stderr above")
        info = json.loads(box[0])
        if not info.get("ok"):
            self.kill()
            raise WorkerUnavailableError(f"{self.role} worker failed to start: {info['error']}")
        self.info = info
        return info

    def request_stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            except (OSError, ValueError):
                pass

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class DisaggregatedCluster:
    """A decode worker plus ``prefill_workers`` prefill workers, each its own process.

    ``kv_blocks`` sizes the decode worker's pool, ``prefill_blocks`` each prefill worker's
    (blocks of ``block_size`` tokens). ``progress(text)`` is called as workers come up.
    Use as a context manager; :meth:`close` stops every process it started.
    """

    def __init__(self, model: str | None = None, *, prefill_workers: int = 1,
                 kv_blocks: int = 256, prefill_blocks: int = 128, block_size: int = 32,
                 dtype: str = "float32", timeout: float = 30.0, prefill_timeout: float = 120.0,
                 max_attempts: int = 2, start_timeout: float = 300.0,
                 torch_threads: int | None = None, secret: str | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.secret = secret or _secrets.token_hex(16)
        self._base = WorkerConfig(model=model, dtype=dtype, block_size=block_size,
                                  secret=self.secret, timeout=timeout,
                                  prefill_timeout=prefill_timeout, max_attempts=max_attempts,
                                  torch_threads=torch_threads)
        self.prefill_blocks = prefill_blocks
        self.start_timeout = start_timeout
        self._progress = progress or (lambda _text: None)
        self._names = itertools.count(0)
        self.prefill: dict[str, _Proc] = {}
        self.client: KVClient | None = None
        try:
            self._progress("starting the decode worker")
            self.decode = _Proc("decode", self._config("decode", kv_blocks), None)
            self.decode_address = bytes.fromhex(self.decode.ready(start_timeout)["address"])
            self.add_prefill_workers(prefill_workers)
            self.client = KVClient(self.decode_address, secret=self.secret, timeout=timeout)
        except BaseException:
            self.close()
            raise

    def _config(self, name: str, blocks: int) -> WorkerConfig:
        cfg = WorkerConfig.from_dict(self._base.to_dict())
        cfg.name, cfg.num_blocks = name, blocks
        return cfg

    def add_prefill_workers(self, n: int = 1) -> list[str]:
        """Start ``n`` more prefill workers (in parallel) and wait until they joined."""
        procs = []
        for _ in range(n):
            name = f"prefill-{next(self._names)}"
            procs.append((name, _Proc("prefill", self._config(name, self.prefill_blocks),
                                      self.decode_address)))
            self.prefill[name] = procs[-1][1]
        for name, proc in procs:
            self._progress(f"waiting for {name}")
            proc.ready(self.start_timeout)
        return [name for name, _ in procs]

    @property
    def pids(self) -> dict[str, int]:
        out = {"decode": self.decode.proc.pid}
        out.update({name: p.proc.pid for name, p in self.prefill.items()})
        return out

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> DisaggResult:
        assert self.client is not None
        return self.client.generate(prompt, **kwargs)

    def submit(self, prompt: str | Sequence[int], **kwargs: Any) -> Future[DisaggResult]:
        assert self.client is not None
        return self.client.submit(prompt, **kwargs)

    def stats(self) -> dict[str, Any]:
        assert self.client is not None
        return self.client.stats()

    def wait_for_workers(self, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until the decode worker lists exactly ``count`` live prefill workers."""
        deadline = time.monotonic() + timeout
        while True:
            names: list[str] = self.stats()["prefill_workers"]
            if len(names) == count or time.monotonic() > deadline:
                return names
            time.sleep(0.1)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        procs = list(self.prefill.values()) + ([self.decode] if hasattr(self, "decode") else [])
        for proc in procs:  # all at once, then wait: shutdown takes one timeout, not N
            proc.request_stop()
        deadline = time.monotonic() + 10
        for proc in procs:
            proc.stop(max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> DisaggregatedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
