"""The decode worker: admits requests, reserves KV blocks, dispatches prefills, decodes.

Threads: a control loop (messages from clients and prefill workers), a monitor (liveness
probes to prefill workers with requests in flight, deadlines, admission of queued requests)
and the decode loop (one request at a time, greedy, from the transferred cache).

Failure handling: a prefill worker that stops answering probes is dropped; each of its
requests is retried on another live worker (new immediate, same blocks) until
``max_attempts``, else fails with :class:`PrefillFailedError` text and its blocks are freed.
A live worker that misses ``prefill_timeout`` is told to abort; its blocks are freed once it
confirms (no write of it can land later), or quarantined if it never does.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import tensorfabric as tf

from ._allocator import BlockTable
from ._base import WorkerBase
from ._cache import PagedKVCache
from ._config import WorkerConfig
from ._errors import KVCacheFullError, LayoutMismatchError
from ._layout import KVLayout
from ._protocol import TAG_CLIENT, TAG_DECODE, TAG_PING, TAG_PREFILL, decode_message, encode

log = logging.getLogger("tensorfabric.kv.decode")


@dataclass
class _Peer:
    name: str
    address: bytes
    inflight: set[int] = field(default_factory=set)


@dataclass
class _Request:
    rid: int
    client: bytes
    client_id: int
    ids: list[int]
    max_new_tokens: int
    max_attempts: int
    pinned: str | None
    fault: float
    replay: bool
    local: bool
    prefill_timeout: float
    admitted: float
    stream: bool = False  # send each token to the client as it is decoded
    table: BlockTable | None = None
    imm: int = 0
    worker: str | None = None
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    expect: tf.Transfer | None = None
    layer_expects: list[tf.Transfer] = field(default_factory=list)
    done_msg: dict[str, Any] | None = None
    landed: bool = False
    deadline: float = 0.0
    aborting: float = 0.0  # when an abort was sent (0: none)
    errors: list[str] = field(default_factory=list)


class DecodeWorker(WorkerBase):
    """One decode worker process's state. Use :func:`run_worker` to run one."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.desc_hex = self.region.descriptor().to_bytes().hex()
        self._lock = threading.RLock()
        self._peers: dict[str, _Peer] = {}
        self._requests: dict[int, _Request] = {}
        self._waiting: collections.deque[_Request] = collections.deque()
        self._ready: queue.Queue[_Request | None] = queue.Queue()
        self._rids = itertools.count(1)
        self._imms = itertools.count(random.getrandbits(40) << 16)
        self._rr = 0
        self._stop = threading.Event()
        self.counters = collections.Counter[str]()

    # -- lifecycle --------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until :meth:`stop` or a ``shutdown`` message."""
        threads = [threading.Thread(target=self._control_loop, name="kv-decode-ctrl",
                                    daemon=True),
                   threading.Thread(target=self._monitor_loop, name="kv-decode-monitor",
                                    daemon=True)]
        for t in threads:
            t.start()
        self._decode_loop()

    def stop(self) -> None:
        self._stop.set()
        self._ready.put(None)

    def close(self) -> None:
        self.stop()
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            try:
                self.engine.send(peer.address, encode("shutdown"), tag=TAG_PREFILL).wait(2)
            except tf.TensorFabricError:
                pass
        self.engine.close()

    # -- control ----------------------------------------------------------------------------

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.engine.recv(tag=TAG_DECODE, timeout=0.5)
            except tf.TransferTimeout:
                continue
            except tf.TensorFabricError:
                return
            try:
                self._handle(decode_message(m.data), m.peer)
            except Exception:  # a bad message must not stop the worker
                log.exception("decode worker %s: bad control message", self.name)

    def _handle(self, msg: dict[str, Any], sender: bytes) -> None:
        kind = msg["type"]
        if kind == "hello":
            self._on_hello(msg)
        elif kind == "request":
            self._on_request(msg, sender)
        elif kind in ("prefill_done", "prefill_failed", "aborted"):
            self._on_prefill_reply(kind, msg)
        elif kind == "stats":
            self._send(sender, TAG_CLIENT, encode("stats", client_id=msg.get("client_id", 0),
                                                   **self.stats()))
        elif kind == "shutdown":
            self.stop()

    def _send(self, peer: bytes, tag: int, data: bytes) -> bool:
        try:
            self.engine.send(peer, data, tag=tag).wait(self.config.timeout)
            return True
        except tf.TensorFabricError as exc:
            # A client that closes right after its last result can cut off the acknowledgement
            # of a message it did receive: not worth a warning.
            level = logging.INFO if tag == TAG_CLIENT else logging.WARNING
            log.log(level, "decode worker %s: send failed: %s", self.name, exc)
            return False

    def _on_hello(self, msg: dict[str, Any]) -> None:
        address = bytes.fromhex(msg["address"])
        try:
            self.layout.check_compatible(KVLayout.from_bytes(msg["layout"].encode()))
        except LayoutMismatchError as exc:
            self._send(address, TAG_PREFILL, encode("reject", reason=str(exc)))
            return
        with self._lock:
            self._peers[msg["name"]] = _Peer(msg["name"], address)
        self._send(address, TAG_PREFILL, encode("welcome", layout=self.layout.to_bytes().decode(),
                                                desc=self.desc_hex))
        self._admit_waiting()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "free_blocks": self.pool.allocator.num_free,
                "num_blocks": self.layout.num_blocks,
                "prefill_workers": sorted(self._peers),
                "inflight": len(self._requests),
                "waiting": len(self._waiting),
                "layers_landed": {str(r.rid): self._landed(r) for r in self._requests.values()},
                **{k: int(v) for k, v in self.counters.items()},
            }

    @staticmethod
    def _landed(req: _Request) -> int:
        """Layers of the current attempt that have fully landed."""
        return sum(1 for t in req.layer_expects if t.done() and t.exception() is None)

    # -- admission and dispatch ---------------------------------------------------------------

    def _on_request(self, msg: dict[str, Any], sender: bytes) -> None:
        ids = msg.get("ids")
        if ids is None:
            from tensorfabric.models import chat_ids

            ids = chat_ids(self.lm, msg["prompt"])
        req = _Request(
            rid=next(self._rids), client=sender, client_id=int(msg["client_id"]),
            ids=[int(t) for t in ids], max_new_tokens=int(msg.get("max_new_tokens", 64)),
            max_attempts=int(msg.get("max_attempts") or self.config.max_attempts),
            pinned=msg.get("prefill_worker"), fault=float(msg.get("fault_layer_delay_s", 0.0)),
            replay=bool(msg.get("measure_replay", False)),
            local=bool(msg.get("local", False)), admitted=time.perf_counter(),
            stream=bool(msg.get("stream", False)),
            prefill_timeout=float(msg.get("prefill_timeout") or self.config.prefill_timeout))
        need = self.layout.blocks_for(len(req.ids) + req.max_new_tokens)
        if not req.ids or req.max_new_tokens < 1 or need > self.layout.num_blocks:
            self._finish(req, kind="too_long", error=(
                f"request needs {need} KV blocks ({len(req.ids)} prompt + {req.max_new_tokens} "
                f"new tokens) but the decode worker has {self.layout.num_blocks}: shorten it "
                "or start the decode worker with more --kv-blocks"))
            return
        with self._lock:
            self._requests[req.rid] = req
            self._waiting.append(req)
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        with self._lock:
            while self._waiting:
                req = self._waiting[0]
                if not req.local and not self._peers:
                    return  # wait for a prefill worker to join (deadline in the monitor)
                try:
                    req.table = self.pool.new_table(len(req.ids) + req.max_new_tokens)
                except KVCacheFullError:
                    return  # FIFO: wait for running requests to free blocks
                self._waiting.popleft()
                if req.local:
                    self._ready.put(req)
                else:
                    self._dispatch(req)

    def _pick(self, req: _Request) -> _Peer | None:
        if req.pinned and req.attempts == 0:
            return self._peers.get(req.pinned)
        names = sorted(self._peers)
        fresh = [n for n in names if n not in req.tried] or names
        if not fresh:
            return None
        self._rr += 1
        return min((self._peers[n] for n in fresh),
                   key=lambda p: (len(p.inflight), (names.index(p.name) - self._rr) % len(names)))

    def _dispatch(self, req: _Request) -> None:
        """Send the request to a prefill worker (lock held)."""
        peer = self._pick(req)
        if peer is None:
            self._fail(req, f"no live prefill worker to run it (tried {req.tried or 'none'})")
            return
        assert req.table is not None
        req.attempts += 1
        req.worker = peer.name
        req.tried.append(peer.name)
        req.imm = next(self._imms)
        req.done_msg, req.landed, req.aborting = None, False, 0.0
        req.table.num_tokens = 0
        req.deadline = time.perf_counter() + req.prefill_timeout
        peer.inflight.add(req.rid)
        # One expect per layer, so progress is visible (stats, tests); the monitor enforces the
        # deadline (abort, then retry or fail) and this timeout only bounds the waits.
        limit = req.prefill_timeout + self.config.abort_grace_s
        req.layer_expects = [self.engine.expect(req.imm, 1, timeout=limit)
                             for _ in range(self.layout.num_layers)]
        req.expect = tf.gather(req.layer_expects, "kv-landed")
        imm = req.imm
        req.expect.add_done_callback(lambda t: self._on_landed(req, imm, t))
        data = encode("prefill", rid=req.rid, imm=req.imm, ids=req.ids,
                      blocks=req.table.block_ids, fault_layer_delay_s=req.fault,
                      measure_replay=req.replay)
        try:
            self.engine.send(peer.address, data, tag=TAG_PREFILL).wait(self.config.timeout)
        except tf.TensorFabricError as exc:
            self._worker_lost(peer.name, exc)

    def _on_landed(self, req: _Request, imm: int, t: tf.Transfer) -> None:
        with self._lock:
            if req.imm != imm or self._requests.get(req.rid) is not req:
                return  # a superseded attempt
            if t.exception() is None:
                req.landed = True
                self._maybe_ready(req)

    def _on_prefill_reply(self, kind: str, msg: dict[str, Any]) -> None:
        with self._lock:
            req = self._requests.get(int(msg["rid"]))
            if req is None or req.imm != int(msg["imm"]):
                return  # a superseded attempt
            if kind == "prefill_done":
                req.done_msg = msg
                self._maybe_ready(req)
                return
            why = msg.get("error") or (
                f"missed its {req.prefill_timeout:g} s deadline and aborted")
            self._retry_or_fail(req, f"prefill worker {msg['worker']} failed: {why}")

    def _maybe_ready(self, req: _Request) -> None:
        if req.landed and req.done_msg is not None and req.aborting >= 0:
            peer = self._peers.get(req.worker or "")
            if peer is not None:
                peer.inflight.discard(req.rid)
            req.aborting = -1.0  # ready: no longer in flight
            assert req.table is not None
            req.table.num_tokens = len(req.ids)
            self._ready.put(req)

    # -- failures -------------------------------------------------------------------------------

    def _worker_lost(self, name: str, exc: BaseException) -> None:
        """A prefill worker is gone: nothing it sent can land any more (lock held)."""
        with self._lock:
            peer = self._peers.pop(name, None)
            if peer is None:
                return
            self.counters["workers_lost"] += 1
            log.warning("decode worker %s: prefill worker %s lost: %s", self.name, name, exc)
            for rid in sorted(peer.inflight):
                req = self._requests.get(rid)
                if req is not None and req.worker == name and req.aborting >= 0:
                    self._retry_or_fail(req, f"prefill worker {name} died mid-transfer "
                                             f"({type(exc).__name__}: {exc})")

    def _retry_or_fail(self, req: _Request, reason: str) -> None:
        req.errors.append(reason)
        if req.expect is not None:
            req.expect.cancel()
        peer = self._peers.get(req.worker or "")
        if peer is not None:
            peer.inflight.discard(req.rid)
        live = [n for n in self._peers if n not in req.tried] or list(self._peers)
        if req.attempts < req.max_attempts and live:
            self.counters["retries"] += 1
            self._dispatch(req)
        else:
            self._fail(req, reason)

    def _fail(self, req: _Request, reason: str) -> None:
        self.counters["failed"] += 1
        self._finish(req, kind="prefill_failed", error=(
            f"request {req.client_id} failed after {req.attempts} prefill attempt(s): "
            f"{'; '.join(req.errors) or reason}. Its KV blocks were freed; retry the request or "
            "start more prefill workers."))

    def _finish(self, req: _Request, *, error: str | None = None, kind: str = "",
                result: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._requests.pop(req.rid, None)
            if req.table is not None:
                req.table.release()
        payload = {"client_id": req.client_id, "ok": error is None, "error": error, "kind": kind,
                   **(result or {})}
        self._send(req.client, TAG_CLIENT, encode("result", **payload))
        self._admit_waiting()

    def _monitor_loop(self) -> None:
        cfg = self.config
        while not self._stop.wait(cfg.heartbeat_s):
            with self._lock:
                busy = [p for p in self._peers.values() if p.inflight]
            for peer in busy:  # a send to a dead process fails at once with BrokenError
                try:
                    self.engine.send(peer.address, b"", tag=TAG_PING).wait(cfg.timeout)
                except tf.TensorFabricError as exc:
                    self._worker_lost(peer.name, exc)
            now = time.perf_counter()
            with self._lock:
                for req in list(self._requests.values()):
                    self._check_deadline(req, now)

    def _check_deadline(self, req: _Request, now: float) -> None:
        cfg = self.config
        if req.table is None:  # still waiting for blocks or a worker
            if now - req.admitted > req.prefill_timeout:
                self._waiting.remove(req)
                self._fail(req, f"not admitted within {req.prefill_timeout:.0f} s (KV cache "
                                "full or no prefill worker)")
            return
        if req.local or req.aborting < 0 or now < req.deadline:
            return
        peer = self._peers.get(req.worker or "")
        if not req.aborting and peer is not None:
            req.aborting = now
            self.counters["timeouts"] += 1
            self._send(peer.address, TAG_PREFILL, encode("abort", rid=req.rid, imm=req.imm))
        elif peer is None or now - req.aborting > cfg.abort_grace_s:
            # It never confirmed: its writes may still land, so these blocks are never reused.
            self.counters["quarantined_blocks"] += len(req.table.block_ids)
            req.table.block_ids = []
            self._fail(req, f"prefill worker {req.worker} missed its {req.prefill_timeout:.0f} s "
                            "deadline and did not confirm the abort")

    # -- decoding -------------------------------------------------------------------------------

    def _streamer(self, req: _Request) -> Any:
        """``on_token`` for a streamed request: each token and the text it adds go to the
        client as a ``token`` message (before the final ``result``)."""
        from tensorfabric.models import TextStream

        text = TextStream(self.lm.tokenizer)

        def on_token(token: int) -> None:
            self._send(req.client, TAG_CLIENT, encode("token", client_id=req.client_id,
                                                      token=token, text=text.push(token)))

        return on_token

    def _decode_loop(self) -> None:
        from tensorfabric.models import decode, prefill

        while True:
            req = self._ready.get()
            if req is None or self._stop.is_set():
                return
            assert req.table is not None
            try:
                cache = PagedKVCache(self.pool, req.table)
                if req.local:  # the single-process path: prefill here, nothing moves
                    first = prefill(self.lm, req.ids, cache)
                    stats: dict[str, Any] = {"prompt_tokens": len(req.ids), "worker": "local"}
                else:
                    assert req.done_msg is not None
                    first = int(req.done_msg["first_token"])
                    stats = dict(req.done_msg["stats"], worker=req.worker, attempts=req.attempts)
                ready = time.perf_counter()
                stats["ttft_s"] = ready - req.admitted
                tokens, stopped = decode(self.lm, first, cache, max_new_tokens=req.max_new_tokens,
                                         on_token=self._streamer(req) if req.stream else None)
                stats["decode_s"] = time.perf_counter() - ready
                text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True)
                self.counters["served"] += 1
                self._finish(req, result={"tokens": tokens, "text": text, "stopped": stopped,
                                          "stats": stats})
            except Exception as exc:
                log.exception("decode worker %s: decoding request %d failed", self.name, req.rid)
                self.counters["failed"] += 1
                try:
                    self._finish(req, kind="decode_failed",
                                 error=f"decoding failed: {type(exc).__name__}: {exc}")
                except Exception:
                    log.exception("decode worker %s: cannot report the failure", self.name)
