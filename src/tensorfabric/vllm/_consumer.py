"""The decode instance's half of the connector's worker: load a request's KV (pull: ask the
prefill instance with its grant; push: offer our blocks and wait), report loads done or
failed, and watch the prefill instances that pending loads wait on."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._engine import Engine
from .._errors import TensorFabricError, TransferTimeout
from .._transfer import Transfer
from ._layout import KVLayout
from ._settings import ConnectorSettings

log = logging.getLogger("tensorfabric.vllm")

TAG = 0x74667676  # control messages between connectors
_MAX_MSG = 1 << 20


@dataclass
class _Load:
    req_id: str
    peer: bytes
    imm: int
    local_blocks: list[int]
    grant: dict[str, Any]
    expect: Transfer | None = None
    started: float = field(default_factory=time.monotonic)
    reason: str = ""
    push: str = ""          # push mode: the push id
    draining: bool = False  # given up, waiting for the prefill's word that no write is left
    final: bool = False     # the prefill instance answered (or is gone): nothing more lands



class ConsumerSide:
    """The decode instance's half of :class:`WorkerSide` (which sets these attributes)."""

    s: ConnectorSettings
    engine: Engine
    region: Any
    layout: KVLayout | None
    _lock: threading.Lock
    _lock_stats: threading.Lock
    _stop: threading.Event
    _loads: dict[str, _Load]
    _by_imm: dict[int, str]
    _recv_done: set[str]
    _recv_failed: set[str]
    _bad_blocks: set[int]
    _pinging: set[bytes]
    _progress: threading.Event
    stats: dict[str, int]

    def wait_progress(self, timeout: float) -> None:
        """Wait until a transfer ends (load done or failed, blocks sent, pushed or freed) or
        ``timeout`` passes."""
        if self._progress.wait(timeout):
            self._progress.clear()

    def _record(self, event: str, req: str, **fields: Any) -> None:
        if not self.s.stats_file:
            return
        line = json.dumps({"event": event, "req": req, "pid": os.getpid(), "time": time.time(),
                           **fields})
        try:
            with self._lock_stats, open(self.s.stats_file, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass

    def load(self, req_id: str, local_blocks: list[int], first: int,
             params: dict[str, Any]) -> None:
        """Ask the prefill instance named in ``params`` for the request's blocks ``first``,
        ``first + 1``, ... (the ones before are a local prefix-cache hit) into
        ``local_blocks``."""
        assert self.layout is not None
        peer = bytes.fromhex(params["tf_engine"])
        imm = secrets.randbits(62) | 1
        if params.get("tf_push"):
            self._offer(req_id, peer, imm, list(local_blocks), first, str(params["tf_push"]))
            return
        g = params["tf_grant"]
        ld = _Load(req_id, peer, imm, list(local_blocks), g)
        src = list(map(int, g["blocks"]))[first:first + len(local_blocks)]
        if not local_blocks or len(src) != len(local_blocks):
            # the grant does not cover what vLLM allocated: free the remote blocks, recompute
            self.release(params)
            with self._lock:
                self._recv_failed.add(req_id)
                self._bad_blocks.update(local_blocks)
            return
        msg = {"op": "pull", **g, "imm": imm, "src_blocks": src, "dst_blocks": ld.local_blocks,
               "dst": self.region.descriptor().to_bytes().hex(), "layout": self.layout.to_json()}
        self._track(ld, peer, msg, self.s.timeout)

    def _offer(self, req_id: str, peer: bytes, imm: int, local_blocks: list[int], first: int,
               pid: str) -> None:
        assert self.layout is not None
        ld = _Load(req_id, peer, imm, local_blocks, {}, push=pid)
        if not local_blocks:
            self.release({"tf_engine": peer.hex(), "tf_push": pid})
            with self._lock:
                self._recv_failed.add(req_id)
            return
        msg = {"op": "offer", "push": pid, "imm": imm, "first": first, "dst_blocks": local_blocks,
               "dst": self.region.descriptor().to_bytes().hex(), "layout": self.layout.to_json()}
        self._track(ld, peer, msg, self.s.push_wait_s)

    def _track(self, ld: _Load, peer: bytes, msg: dict[str, Any], timeout: float) -> None:
        """Expect ``ld``'s immediate (its KV landed), record the load, and send ``msg`` (a pull
        or an offer) to the prefill engine ``peer``."""
        req_id, imm = ld.req_id, ld.imm
        ld.expect = self.engine.expect(imm, 1, timeout=timeout)
        with self._lock:
            self._loads[req_id] = ld
            self._by_imm[imm] = req_id
        ld.expect.add_done_callback(lambda t: self._loaded(req_id, t))
        self._send(peer, msg, on_fail=lambda e: self._fail(
            req_id, f"cannot reach prefill: {e}", final=not isinstance(e, TransferTimeout)))

    def cancel_load(self, req_id: str) -> None:
        """vLLM aborted a push-mode request that waits for its KV: withdraw the offer; the
        load ends (failed) when the prefill instance answers, dies, or after ``timeout``
        (see :meth:`_loaded`)."""
        with self._lock:
            ld = self._loads.get(req_id)
            if ld is None or not ld.push or ld.draining:
                return
            ld.reason = "the request was aborted"
        if ld.expect is not None:
            ld.expect.cancel()   # -> _loaded: drains like a timeout

    def release(self, params: dict[str, Any]) -> None:
        peer = bytes.fromhex(params["tf_engine"])
        if params.get("tf_push"):
            self._send(peer, {"op": "withdraw", "push": params["tf_push"]})
        else:
            self._send(peer, {"op": "release", **params["tf_grant"]})

    def _send(self, peer: bytes, msg: dict[str, Any], on_fail: Any = None) -> None:
        try:
            t = self.engine.send(peer, json.dumps(msg).encode(), tag=TAG,
                                 timeout=max(self.s.heartbeat_s * 4, 2.0))
        except TensorFabricError as exc:
            if on_fail:
                on_fail(exc)
            return
        if on_fail:
            t.add_done_callback(lambda t: t.exception() and on_fail(t.exception()))

    def _fail(self, req_id: str, reason: str, *, final: bool) -> None:
        """End the load of ``req_id``. ``final``: the prefill instance said so, or its engine
        is gone (nothing of its can land any more): the blocks go back at once. Otherwise (a
        timeout: it may be alive and writing) the load drains first (see :meth:`_loaded`)."""
        with self._lock:
            ld = self._loads.get(req_id)
            if ld is None or ld.expect is None or (ld.draining and not final):
                return
            ld.reason = ld.reason or reason
            ld.final = ld.final or final
        ld.expect.cancel()

    def _loaded(self, req_id: str, t: Transfer) -> None:
        err = t.exception()
        with self._lock:
            ld = self._loads.get(req_id)
            if ld is None:
                return
            drain = err is not None and not ld.draining and not ld.final
            if drain:
                # we gave up (a timeout, an abort) but the prefill instance may be alive and
                # writing: vLLM must not get the blocks back (and reuse them) while a write
                # can still land in them. Ask it to stop and free them only once it answers
                # (after its write in flight has ended), dies, or can no longer write.
                ld.draining = True
                ld.reason = ld.reason or (
                    f"no KV within push_wait_s={self.s.push_wait_s:.0f} s" if ld.push
                    else f"no KV within timeout={self.s.timeout:g} s")
                ld.expect = self.engine.expect(ld.imm, 1, timeout=self._drain_s(ld))
            else:
                del self._loads[req_id]
        if drain:
            assert ld.expect is not None
            if ld.push:
                self._send(ld.peer, {"op": "withdraw", "push": ld.push, "imm": ld.imm})
            else:
                self._send(ld.peer, {"op": "cancel", **ld.grant, "imm": ld.imm})
            ld.expect.add_done_callback(lambda t: self._loaded(req_id, t))
            return
        self._progress.set()
        with self._lock:
            self._by_imm.pop(ld.imm, None)
            if err is None:
                self._recv_done.add(req_id)
                self.stats["loads_ok"] += 1
            else:
                self._recv_failed.add(req_id)
                self._bad_blocks.update(ld.local_blocks)
                self.stats["loads_failed"] += 1
        assert self.layout is not None
        nbytes = len(ld.local_blocks) * len(self.layout.layers) * self.layout.block_bytes
        seconds = time.monotonic() - ld.started
        if err is None:
            self._record("loaded", req_id, bytes=nbytes, seconds=seconds,
                         shm=self.region.descriptor().shm, mode="push" if ld.push else "pull")
            return
        why = ld.reason or (f"no KV within {self.s.timeout} s" if isinstance(err, TransferTimeout)
                            else str(err))
        log.warning("tensorfabric: loading KV of %s failed (%s); vLLM recomputes it", req_id, why)
        self._record("load_failed", req_id, bytes=nbytes, seconds=seconds, error=why)
        if not ld.draining:   # (a drained load has told the prefill instance already)
            if ld.push:
                self._send(ld.peer, {"op": "withdraw", "push": ld.push})
            else:
                self._send(ld.peer, {"op": "cancel", **ld.grant})

    def _drain_s(self, ld: _Load) -> float:
        """How long a load that gave up waits for the prefill instance's answer: past it, no
        write of its can be in flight. Push: its writes time out after ``timeout``. Pull: it
        starts no write after the grant's expiry, and that write times out after
        ``timeout``."""
        left = 0.0 if ld.push else max(float(ld.grant.get("expiry", 0)) - time.time(), 0.0)
        return left + self.s.timeout + 1.0

    def finished_recving(self) -> tuple[set[str], set[str], set[int]]:
        with self._lock:
            done, failed, bad = self._recv_done, self._recv_failed, self._bad_blocks
            self._recv_done, self._recv_failed, self._bad_blocks = set(), set(), set()
        return done | failed, failed, bad

    def _watch(self) -> None:
        """Ping the prefill instances that pending loads wait on: a dead one fails them now."""
        while not self._stop.wait(self.s.heartbeat_s):
            with self._lock:
                peers = {ld.peer for ld in self._loads.values()} - self._pinging
                self._pinging |= peers
            for peer in peers:
                self._ping(peer)

    def _ping(self, peer: bytes) -> None:
        def done(t: Transfer) -> None:
            err = t.exception()
            if err is None:
                with self._lock:
                    self._pinging.discard(peer)
            else:
                self._peer_gone(peer, err)
        try:
            t = self.engine.send(peer, b'{"op":"ping"}', tag=TAG,
                                 timeout=max(self.s.heartbeat_s * 4, 2.0))
        except TensorFabricError as exc:
            self._peer_gone(peer, exc)
            return
        t.add_done_callback(done)

    def _peer_gone(self, peer: bytes, err: BaseException) -> None:
        with self._lock:
            self._pinging.discard(peer)
            dead = [r for r, ld in self._loads.items() if ld.peer == peer]
        # a refused or broken connection: its process (and engine) is gone. A ping that timed
        # out: it may be stalled, not dead (its writes could still land): drain
        final = not isinstance(err, TransferTimeout)
        for req in dead:
            self._fail(req, f"prefill instance unreachable: {err}", final=final)

