"""The worker half of the connector: an engine, the KV buffer as a region, and the transfers.

Producer (prefill instance): keeps finished requests' blocks until a decode instance asks for
them with a valid grant, writes them with one ``write_pages`` (every layer) carrying the
decoder's immediate, and reports the request as finished sending when the write is done, has
failed, or nobody asked within ``hold_s``.

Consumer (decode instance): asks the prefill instance for a request's blocks (a ``pull``
message with its region's descriptor and its block ids), waits for the immediate, and reports
the request as received, or as failed (its blocks then go to ``get_block_ids_with_load_errors``
and vLLM recomputes them) on a refusal, a prefill instance that is gone, or a timeout; after a
timeout only once the prefill instance has answered that no write of that request is left (or
the grant's expiry plus ``timeout`` has passed): vLLM reuses failed blocks at once, and a late
write must not land in them.

Push mode (``tf_push`` in the params, see ``_push.py``): the decode instance sends an
``offer`` instead as soon as it has blocks, and the prefill instance writes layers into them
while it computes the prompt.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from typing import Any

from .._engine import Engine
from .._errors import ClosedError, TensorFabricError, TransferTimeout
from .._region import Access
from .._transfer import Transfer
from . import _tokens
from ._layout import KVLayout, layout_of, shm_allocation
from ._consumer import _MAX_MSG, TAG, ConsumerSide, _Load
from ._push import Pusher
from ._settings import ConnectorSettings

log = logging.getLogger("tensorfabric.vllm")

class WorkerSide(ConsumerSide):
    def __init__(self, settings: ConnectorSettings, block_size: int, role: str) -> None:
        self.s = settings
        self.block_size = block_size
        self.role = role
        self.engine = Engine(settings.secret, host=settings.host, transports=settings.transports,
                             timeout=settings.timeout,
                             name=settings.name or f"vllm-{role}-{os.getpid()}")
        self.key = secrets.token_bytes(32)   # signs grants; the scheduler gets it by handshake
        self.region: Any = None
        self.kv_tensor: Any = None
        self.layout: KVLayout | None = None
        self._lock = threading.Lock()
        self._lock_stats = threading.Lock()
        # producer
        self._held: dict[str, float] = {}         # request -> grant expiry
        self._inflight: dict[str, Transfer] = {}  # request -> its write_pages
        self._spent: dict[str, float] = {}        # sent, released or expired (until expiry)
        self._to_report: set[str] = set()
        self._finished_seen: set[str] = set()
        self._spent_push: dict[str, float] = {}  # push ids pushed, failed or withdrawn
        self.pusher = Pusher(self)
        # consumer
        self._loads: dict[str, _Load] = {}
        self._by_imm: dict[int, str] = {}
        self._recv_done: set[str] = set()
        self._recv_failed: set[str] = set()
        self._bad_blocks: set[int] = set()
        self._pinging: set[bytes] = set()
        self.stats = {"pulls": 0, "pushes": 0, "bytes": 0, "loads_ok": 0, "loads_failed": 0,
                      "expired": 0}
        self._stop = threading.Event()
        self._progress = threading.Event()   # a transfer ended (see wait_progress)
        self._threads = [threading.Thread(target=self._serve, name="tf-vllm-serve", daemon=True),
                         threading.Thread(target=self._watch, name="tf-vllm-watch", daemon=True)]
        for t in self._threads:
            t.start()

    # -- KV memory --------------------------------------------------------------------------

    def allocation_context(self) -> Any:
        if not self.s.shm_kv or "shm" not in self.s.transports:
            return None
        return shm_allocation(self._alloc_kv)

    def _alloc_kv(self, nbytes: int) -> Any:
        import torch

        if self.region is not None:
            raise RuntimeError("vLLM allocated a second KV buffer; the tensorfabric connector "
                               "supports one (a single KV cache group)")
        # Shared memory cannot be mapped write-only, so the engine hands a same-host writer a
        # readable mapping only when the region grants reads too (else it goes over tcp).
        # The key reaches only the prefill instance this decode instance pulls from.
        self.region = self.engine.alloc(nbytes, access=Access.READ_WRITE)
        self.kv_tensor = torch.frombuffer(self.region.view, dtype=torch.int8)
        return self.kv_tensor

    def register(self, kv_caches: dict[str, Any]) -> None:
        import torch

        storages = {t.untyped_storage().data_ptr() for t in kv_caches.values()}
        if len(storages) != 1:
            raise RuntimeError(f"vLLM's KV layers live in {len(storages)} buffers; the "
                               "tensorfabric connector needs them in one")
        ptr = storages.pop()
        if self.kv_tensor is None or self.kv_tensor.data_ptr() != ptr:
            if self.region is not None:
                self.engine.unregister(self.region)
            # vLLM allocated the buffer itself: register it as it is (peers reach it by tcp)
            first = next(iter(kv_caches.values()))
            nbytes = first.untyped_storage().nbytes()
            self.kv_tensor = torch.empty(0, dtype=torch.int8).set_(first.untyped_storage(), 0,
                                                                     (nbytes,), (1,))
            self.region = self.engine.register(self.kv_tensor, access=Access.REMOTE_WRITE)
            log.info("tensorfabric: KV cache registered in vLLM's memory (no shared memory)")
        self.layout = layout_of(kv_caches, ptr, self.block_size)
        log.info("tensorfabric: %d KV layers, %d blocks of %d bytes, engine %s, shm=%s",
                 len(self.layout.layers), self.layout.num_blocks, self.layout.block_bytes,
                 self.engine.name, self.region.descriptor().shm)

    def handshake(self) -> dict[str, Any]:
        assert self.layout is not None
        return {"address": self.engine.address.hex(), "key": self.key.hex(),
                "layout": self.layout.to_json()}

    # -- producer -----------------------------------------------------------------------------

    def hold(self, reqs: dict[str, float]) -> None:
        with self._lock:
            for req, expiry in reqs.items():
                if req not in self._spent:   # a pull can beat the scheduler's word
                    self._held[req] = expiry

    def _on_pull(self, peer: bytes, msg: dict[str, Any]) -> None:
        req = str(msg.get("req"))
        op = msg.get("op")
        reply_imm = msg.get("imm")
        if not _tokens.check(self.key, msg):
            self._refuse(peer, reply_imm, f"request {req}: bad or forged grant")
            return
        now = time.time()
        answer = refuse = ""
        with self._lock:
            if op == "cancel":
                # the decode instance gave up on this request. A write in flight is not
                # cancelled (bytes on their way would still land): its end answers, with the
                # immediate after the KV or with "failed". Else no write comes any more
                # (later pulls are refused): say so now, and it frees its blocks.
                if req in self._inflight:
                    return
                if req not in self._spent:
                    self._free(req, now)
                answer = f"request {req}: cancelled, no write in flight"
            elif (req in self._spent or req in self._inflight
                  or (op == "pull" and self.pusher.busy(req))):
                refuse = f"request {req}: blocks already sent"
            elif now > float(msg["expiry"]):
                refuse = f"request {req}: blocks expired"
            elif op == "release":
                self._free(req, now)
                return
        if answer:
            self._refuse(peer, reply_imm, answer, warn=False)
            return
        if refuse:
            self._refuse(peer, reply_imm, refuse)
            return
        try:
            remote = KVLayout.from_json(msg["layout"])
            assert self.layout is not None
            self.layout.check_compatible(remote, ours="prefill", theirs="decode")
            granted = list(map(int, msg["blocks"]))
            src = list(map(int, msg["src_blocks"]))
            dst = list(map(int, msg["dst_blocks"]))
            if len(src) != len(dst) or not set(src) <= set(granted):
                raise ValueError("asks for blocks outside its grant")
            t = self.engine.write_pages(
                self.region, bytes.fromhex(msg["dst"]), src_pages=self.layout.pages(src),
                dst_pages=remote.pages(dst), page_size=self.layout.block_bytes,
                imm=int(msg["imm"]), timeout=self.s.timeout)
        except (TensorFabricError, ValueError, KeyError, TypeError, AssertionError) as exc:
            with self._lock:
                self._free(req, now)
            self._refuse(peer, reply_imm, f"request {req}: {exc}")
            return
        with self._lock:
            self._inflight[req] = t
            self.stats["pulls"] += 1
        t.add_done_callback(lambda t: self._sent(peer, req, reply_imm, t))

    def _sent(self, peer: bytes, req: str, imm: Any, t: Transfer) -> None:
        err = t.exception()
        with self._lock:
            self._inflight.pop(req, None)
            self._free(req, time.time())
            if err is None:
                self.stats["bytes"] += t.nbytes
        self._record("sent" if err is None else "send_failed", req, bytes=t.nbytes,
                     seconds=t.elapsed, error=None if err is None else str(err))
        if err is not None:
            log.warning("tensorfabric: sending KV of %s failed (%s); its blocks are freed", req, err)
            self._refuse(peer, imm, f"request {req}: write failed: {err}")

    def _free(self, req: str, now: float) -> None:   # holding self._lock
        self._spent[req] = self._held.pop(req, now + self.s.hold_s)
        self._to_report.add(req)
        self._progress.set()
        self.pusher.forget(req)

    # -- push mode, prefill side (called by the Pusher) -------------------------------------

    def begin_step(self, push: dict[str, Any], abort: list[str]) -> None:
        for req in abort:
            self.pusher.abort(req, "the prefill request was aborted")
        self.pusher.begin_step(push)

    def spent_push(self, pid: str) -> bool:
        return pid in self._spent_push

    def note_spent_push(self, pid: str) -> None:
        self._spent_push[pid] = time.time() + self.s.push_wait_s

    def tell_failed(self, peer: bytes, imm: int, reason: str) -> None:
        self._refuse(peer, imm, reason)

    def pushed(self, req: str, pid: str, *, nbytes: int, writes: int, early: int,
               seconds: float, error: str, offered: bool,
               after_prefill: float | None = None) -> None:
        with self._lock:
            if error and not offered:
                self.pusher.forget(req)   # nobody offered: the blocks wait for a pull or expire
            else:
                self._free(req, time.time())
                if not error:
                    self.stats["pushes"] += 1
                    self.stats["bytes"] += nbytes
        # after_prefill_s: from the prompt's last layer computed to the decode instance told
        self._record("pushed" if not error else "push_failed", req, bytes=nbytes,
                     writes=writes, early_writes=early, seconds=seconds,
                     after_prefill_s=after_prefill, error=error or None)

    def _refuse(self, peer: bytes, imm: Any, reason: str, warn: bool = True) -> None:
        if warn:
            log.warning("tensorfabric: refused a KV pull: %s", reason)
        if imm is None:
            return
        body = json.dumps({"op": "failed", "imm": imm, "reason": reason}).encode()
        try:
            self.engine.send(peer, body, tag=TAG, timeout=self.s.heartbeat_s * 4)
        except TensorFabricError:
            pass

    def finished_sending(self, finished: set[str]) -> set[str]:
        for req in finished:
            self.pusher.finished(req)
        now = time.time()
        expired: list[str] = []
        with self._lock:
            self._finished_seen |= finished
            for req, expiry in list(self._held.items()):
                if now > expiry and req not in self._inflight and not self.pusher.busy(req):
                    log.warning("tensorfabric: no decode instance asked for %s within %.0f s; "
                                "its blocks are freed", req, self.s.hold_s)
                    self.stats["expired"] += 1
                    self._free(req, now)
                    expired.append(req)
            out = self._to_report & self._finished_seen
            self._to_report -= out
            # keep only what may still be reported (vLLM finishes every request, not just ours)
            self._finished_seen &= self._to_report | set(self._held) | set(self._inflight)
            for req, expiry in list(self._spent.items()):
                if now > expiry + 60:
                    del self._spent[req]
            for pid, expiry in list(self._spent_push.items()):
                if now > expiry:
                    del self._spent_push[pid]
        for req in expired:
            self._record("expired", req)
        return out

    # -- threads ------------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.engine.recv(tag=TAG, timeout=0.5)
            except TransferTimeout:
                continue
            except ClosedError:
                return
            if len(m.data) > _MAX_MSG:
                continue
            try:
                msg = json.loads(m.data)
                op = msg.get("op")
                if op in ("pull", "release", "cancel"):
                    self._on_pull(m.peer, msg)
                elif op == "offer":
                    self._on_offer(m.peer, msg)
                elif op == "withdraw":
                    self.pusher.withdraw(str(msg.get("push", "")),
                                         "withdrawn by the decode instance", m.peer, msg.get("imm"))
                elif op == "failed":
                    with self._lock:
                        req = self._by_imm.get(int(msg["imm"]))
                    if req is not None:
                        self._fail(req, str(msg.get("reason")), final=True)
            except Exception:  # noqa: BLE001 - a bad message must not stop the server
                log.exception("tensorfabric: bad control message from a peer")

    def _on_offer(self, peer: bytes, msg: dict[str, Any]) -> None:
        try:
            why = self.pusher.offer(peer, msg)
        except (TensorFabricError, ValueError, KeyError, TypeError) as exc:
            why = f"bad offer: {exc}"
        if why:
            self._refuse(peer, msg.get("imm"), why)

    def close(self) -> None:
        self._stop.set()
        self.engine.close()
