"""NIXL transport, control messages and the owner's side: answering region opens, revoking
them on unregister (both ends), checking every op's notification (see ``_nixl``)."""

from __future__ import annotations

import queue
import struct
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import _wire as w
from .._address import EngineAddress
from .._errors import TensorFabricError
from .._region import Access
from ._nixl_base import (_ACK, _F_IMM, _F_NO_ACK, _NO_SEGS, _NOTE, _OPEN, _REPLY, _REVOKE,
                         _REVOKED_MAX, _SEG1, TAG_OPEN, TAG_OPEN_REPLY, TAG_REVOKE,
                         TAG_REVOKE_REPLY, _Op, _Prepared, _Remote, agent_name, log)

_MAX_WORK = 1024  # opens and revocations queued for the control thread, from all peers

if TYPE_CHECKING:
    from .._transfer import Transfer
    from ._base import InboundHandler


class NixlOwner:
    """The owner half of :class:`~._nixl.NixlTransport` (a mixin: it uses the transport's
    agent, lock and tables)."""

    handler: InboundHandler
    backend: str
    _agent: Any
    _lock: threading.RLock
    _remote_agents: dict[bytes, str]
    _peer_of_agent: dict[str, bytes]
    _owned: dict[int, tuple[Any, memoryview]]
    _local: dict[int, tuple[Any, int, memoryview]]
    _retired: list[tuple[Any, memoryview]]
    _ops: dict[int, _Op]
    _opens: dict[int, list[Any]]
    _work: queue.SimpleQueue[Callable[[], Any] | None]
    _openers: dict[int, dict[bytes, EngineAddress]]  # region -> peers we gave its metadata
    _revoking: dict[int, tuple[bytes, threading.Event]]  # request id -> (peer, confirmed)
    _req_ids: Any
    revoke_timeout: float
    _tainted: set[int]
    _remotes: dict[tuple[bytes, int, int, bytes], _Remote]  # (initiator) opened peer regions
    _revoked: OrderedDict[tuple[bytes, int], None]  # (initiator) peer regions revoked

    if TYPE_CHECKING:  # provided by NixlTransport
        def _register(self, view: memoryview) -> Any: ...
        def _deregister(self, reg: Any) -> None: ...
        def _unprepare(self, which: Callable[[_Prepared], bool]) -> None: ...
        def _control(self, peer: EngineAddress, tag: int, body: bytes) -> Transfer: ...

    def forget_region(self, region: int) -> None:
        """The engine unregistered ``region`` (the owner refuses every later op on it). Every
        peer we gave its metadata is told and confirms, before this returns, that it dropped
        the region and has nothing of it in flight; then the registration is released, so an
        RDMA NIC refuses the old key too. If a peer does not confirm (gone, or too slow), the
        registration and the buffer are retired instead, until the engine closes:
        deregistering memory under a peer that still uses its metadata crashed NIXL 1.5.1's
        initiator (a segfault in createXferReq)."""
        with self._lock:
            self._unprepare(lambda p: p.local_rid == region)  # before the memory goes
            owned = self._owned.pop(region, None)
            local = self._local.pop(region, None)
            openers = self._openers.pop(region, {})
            tainted = region in self._tainted
            self._tainted.discard(region)
        if local is not None:
            self._deregister(local[0])  # our own sources: no peer holds their metadata
        missing = self._revoke(region, openers) if openers else []
        if owned is None:
            return
        if missing or tainted:  # a forgotten peer cannot confirm: it may come back with it
            log.warning("nixl: %d peer(s) did not confirm dropping region %d; its NIXL "
                        "registration is kept until the engine closes", len(missing), region)
            with self._lock:
                self._retired.append(owned)
        else:
            self._deregister(owned[0])

    def forget_peer(self, peer_id: bytes) -> None:
        """A peer gone past its grace: drop everything kept for it (its NIXL metadata, what
        it opened and we opened). Regions it had opened are retired, not deregistered, when
        they are unregistered (it cannot confirm; see ``forget_region``)."""
        with self._lock:
            for region, openers in self._openers.items():
                if openers.pop(peer_id, None) is not None:
                    self._tainted.add(region)
            for region in [r for r, o in self._openers.items() if not o]:
                del self._openers[region]
            for key in [k for k in self._revoked if k[0] == peer_id]:
                del self._revoked[key]
        self._drop_peer(peer_id)

    def _drop_peer(self, peer_id: bytes) -> None:
        """A transfer to this peer failed: forget its metadata so later ops open afresh
        (and fail promptly over tcp if it is gone)."""
        for key in [k for k in self._remotes if k[0] == peer_id]:
            self._remotes.pop(key, None)
        name = self._remote_agents.pop(peer_id, None)
        self._unprepare(lambda p: p.remote.agent == agent_name(peer_id))
        if name is not None:
            self._peer_of_agent.pop(name, None)
            try:
                with self._lock:
                    self._agent.remove_remote_agent(name)
            except Exception:
                pass

    def _revoke(self, region: int, openers: dict[bytes, EngineAddress]) -> list[bytes]:
        """Tell each opener that ``region`` is gone; wait (up to ``revoke_timeout``) for each
        to confirm. Returns the peers that did not."""
        waits: list[tuple[bytes, int, threading.Event, Transfer | None]] = []
        for peer_id, peer in openers.items():
            rid = next(self._req_ids)
            ev = threading.Event()
            self._revoking[rid] = (peer_id, ev)
            try:
                sent: Transfer | None = self._control(peer, TAG_REVOKE,
                                                      _REVOKE.pack(b"tfNX", rid, region))
            except TensorFabricError as exc:
                log.debug("nixl: cannot tell %s that region %d is gone: %s", peer, region, exc)
                sent = None
            waits.append((peer_id, rid, ev, sent))
        deadline = time.monotonic() + self.revoke_timeout
        missing = []
        for peer_id, rid, ev, sent in waits:
            while not ev.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline or sent is None or sent.exception() is not None:
                    break  # too slow, or the message could not be delivered (peer gone)
            if not ev.is_set():
                missing.append(peer_id)
            self._revoking.pop(rid, None)
        return missing

    def on_control(self, peer: EngineAddress, tag: int, data: bytes) -> tuple[int, str]:
        """A control message from an authenticated peer (called from a tcp thread)."""
        if tag in (TAG_OPEN, TAG_REVOKE) and self._work.qsize() >= _MAX_WORK:
            return w.Status.ERROR, "nixl control queue full"  # a peer flooding us: bounded
        if tag == TAG_OPEN:
            self._work.put(lambda: self._answer_open(peer, data))
        elif tag == TAG_OPEN_REPLY and len(data) >= _REPLY.size:
            magic, rid, status, base, nbytes, tlen, mlen = _REPLY.unpack_from(data)
            slot = self._opens.get(rid)
            if slot is not None and magic == b"tfNR":
                text = data[_REPLY.size:_REPLY.size + tlen].decode(errors="replace")
                slot[1] = (status, text, base, nbytes, data[_REPLY.size + tlen:])
                slot[0].set()
        elif tag == TAG_REVOKE and len(data) == _REVOKE.size:
            self._work.put(lambda: self._on_revoke(peer, data))
        elif tag == TAG_REVOKE_REPLY and len(data) == _REVOKE.size:
            _, rid, _ = _REVOKE.unpack(data)
            hit = self._revoking.get(rid)
            if hit is not None and hit[0] == peer.engine_id:  # only the peer we asked
                hit[1].set()
        else:
            return w.Status.ERROR, "malformed nixl control message"
        return w.Status.OK, ""

    def _on_revoke(self, peer: EngineAddress, data: bytes) -> None:
        """The owner unregistered one of its regions (on the control thread): drop what we
        hold for it, let what is already posted to it end, then confirm. Nothing is posted
        to it after this (``_post`` checks under the lock), and a new open is refused."""
        _, rid, region = _REVOKE.unpack(data)
        owner = peer.engine_id
        with self._lock:
            self._revoked[(owner, region)] = None
            while len(self._revoked) > _REVOKED_MAX:
                self._revoked.popitem(last=False)
            gone = [self._remotes.pop(k) for k in list(self._remotes)
                    if k[0] == owner and k[1] == region]
            for remote in gone:
                remote.revoked = True
            self._unprepare(lambda p: p.remote.revoked)
        deadline = time.monotonic() + self.revoke_timeout
        while time.monotonic() < deadline and any(
                op.peer.engine_id == owner and op.region == region and not op.xfer_done
                for op in list(self._ops.values())):
            time.sleep(0.001)
        try:
            self._control(peer, TAG_REVOKE_REPLY, _REVOKE.pack(b"tfNY", rid, region))
        except TensorFabricError as exc:
            log.debug("nixl: cannot confirm a revocation to %s: %s", peer, exc)

    # -- ops (initiator) ------------------------------------------------------------------

    # -- answering an open (owner) --------------------------------------------------------

    def _answer_open(self, peer: EngineAddress, data: bytes) -> None:
        try:
            magic, rid, region, need, key, mlen = _OPEN.unpack_from(data)
        except struct.error:
            log.warning("nixl: malformed open request from %s", peer)
            return
        status, text, base, nbytes, md = self._check_open(peer, data, region, need, key, mlen)
        tb = text.encode()[:2000]
        reply = _REPLY.pack(b"tfNR", rid, status, base, nbytes, len(tb), len(md)) + tb + md
        try:
            self._control(peer, TAG_OPEN_REPLY, reply)
        except TensorFabricError as exc:
            log.warning("nixl: cannot answer %s: %s", peer, exc)

    def _check_open(self, peer: EngineAddress, data: bytes, region: int, need: int,
                    key: bytes, mlen: int) -> tuple[int, str, int, int, bytes]:
        status, text, view = self.handler.resolve(region, key, need, _NO_SEGS)
        if status != w.Status.OK or view is None:
            return status, text, 0, 0, b""
        if self.handler.resolve(region, key, Access.REMOTE_WRITE, _NO_SEGS)[0] != w.Status.OK:
            # NIXL memory keys allow reads and writes: a read-only region's metadata would
            # let a peer that bypasses tensorfabric write it (honest peers read it over tcp)
            return (w.Status.NOT_PERMITTED, f"region {region} is read-only, which nixl cannot "
                    "enforce: read it over tcp or shm", 0, 0, b"")
        want = agent_name(peer.engine_id)
        try:
            with self._lock:
                if self._remote_agents.get(peer.engine_id) != want:
                    name = self._agent.add_remote_agent(data[_OPEN.size:_OPEN.size + mlen])
                    name = name.decode() if isinstance(name, bytes) else name
                    if name != want:  # metadata must belong to the engine that authenticated
                        self._agent.remove_remote_agent(name)
                        return w.Status.NOT_PERMITTED, "NIXL agent does not match the peer", 0, 0, b""
                    self._remote_agents[peer.engine_id] = name
                    self._peer_of_agent[name] = peer.engine_id
                owned = self._owned.get(region)
                if owned is None or owned[1] is not view:
                    owned = self._owned[region] = (self._register(view), view)
                self._openers.setdefault(region, {})[peer.engine_id] = peer
                md = self._agent.get_partial_agent_metadata(owned[0], True, [self.backend])
        except Exception as exc:
            log.warning("nixl: open of region %d for %s failed: %s", region, peer, exc)
            return w.Status.ERROR, f"NIXL failed to register the region: {exc}", 0, 0, b""
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        return w.Status.OK, "", addr, view.nbytes, md

    def _on_note(self, agent: str, msg: bytes) -> None:
        if msg[:4] == b"tfNA" and len(msg) >= _ACK.size:
            _, op_id, status = _ACK.unpack_from(msg)
            op = self._ops.get(op_id)
            if op is not None and self._remote_agents.get(op.peer.engine_id) == agent:
                op.ack = (status, msg[_ACK.size:].decode(errors="replace"))
            return
        peer_id = self._peer_of_agent.get(agent)
        if msg[:4] != b"tfNN" or len(msg) < _NOTE.size or peer_id is None:
            log.warning("nixl: dropped a notification from unknown agent %r", agent)
            return
        _, op_id, region, need, flags, imm, key = _NOTE.unpack_from(msg)
        status, text = self._check_note(region, key, need, msg[_NOTE.size:])
        if status == w.Status.OK and need == Access.REMOTE_WRITE:
            self.handler.landed(peer_id, op_id, 0, 1, imm if flags & _F_IMM else None)
        elif status != w.Status.OK:
            log.warning("nixl: refused op %d from %s: %s", op_id, agent, text)
        if flags & _F_NO_ACK:
            return
        ack = _ACK.pack(b"tfNA", op_id, status) + text.encode()[:2000]
        try:
            with self._lock:
                self._agent.send_notif(agent, ack)
        except Exception as exc:
            log.warning("nixl: cannot acknowledge op %d to %s: %s", op_id, agent, exc)

    def _check_note(self, region: int, key: bytes, need: int, body: bytes) -> tuple[int, str]:
        """The owner's check of one op: region registered, key, permission (the engine's
        ``resolve``) and every segment inside the region."""
        if len(body) == _SEG1.size:  # one segment: bounds in plain ints, cheaper than numpy
            status, text, view = self.handler.resolve(region, key, need, _NO_SEGS)
            off, n = _SEG1.unpack(body)
            size = view.nbytes if view is not None else 0
            if status == w.Status.OK and not (off <= size and n <= size - off):
                status, text = (w.Status.OUT_OF_BOUNDS,
                                f"access outside region {region} ({size} bytes)")
            return status, text
        if len(body) % w.SEG_DTYPE.itemsize:
            return w.Status.ERROR, "malformed segment table"
        table = np.frombuffer(body, dtype=w.SEG_DTYPE)
        return self.handler.resolve(region, key, need, table)[:2]


__all__ = ["NixlOwner"]
