"""NIXL: RDMA (UCX verbs on ConnectX, libfabric on EFA) and UCX shm/tcp through NVIDIA NIXL.

Each engine that lists ``"nixl"`` in its transports owns one NIXL agent named after its engine
id. No NIXL metadata is published: a peer gets it only through our authenticated tcp link.

* **Open** (once per peer, region and access): the initiator sends ``OPEN`` (region id, access
  key, wanted access, its own connection-only metadata) as a control message over tcp. The
  owner checks key and permission with the engine (``resolve``), registers the region with
  NIXL, loads the initiator's metadata (its agent name must match the authenticated engine
  id) and answers with *partial* metadata naming that one region, its size and address.
* **Write / read**: one NIXL transfer per op (all segments of ``write_pages`` in one
  descriptor list) and one notification with op id, region, key, segment table and the
  immediate (a write's rides on its transfer, after the bytes; a read's goes just before the
  read). On arrival the owner checks the region again (registered, key, permission,
  bounds), counts the immediate, and acknowledges with a notification back; that
  acknowledgement completes the initiator's transfer, as tcp's and shm's do.
* **Prepared transfers**: a transfer request is kept after its op (per remote region, local
  memory and segment shape, at most ``_PREP_MAX`` shapes) and posted again, with the next
  op's notification, when the same shape comes back; the initiator's checks ran when it was
  made, the owner's checks run on every op. Requests are released when the local region is
  unregistered, the peer is dropped, the shape is evicted or the engine closes.
* A progress thread polls NIXL (transfer states, notifications) with adaptive back-off; with
  the progress thread of NIXL itself off (default) this is the only busy loop.

What NIXL checks itself (initiator side only): descriptors must lie inside memory the remote
metadata names and inside locally registered memory. The owner's NIC (RDMA) refuses accesses
with invalid keys; UCX's shm/cma/tcp paths check nothing at the target. See docs/nixl.md.

The code: this module (the initiator, the progress loop, life cycle), ``_nixl_owner`` (the
owner's side: opens and notification checks), ``_nixl_base`` (wire formats, the agent's
making, records).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from .. import _wire as w
from .._address import EngineAddress
from .._errors import AccessError, BrokenError, ClosedError, ConfigError, TensorFabricError
from .._ops import WireOp, simple_chunk, status_error
from .._region import Access, RegionDescriptor
from .._transfer import Transfer
from ._base import InboundHandler, Transport
from ._nixl_base import (  # noqa: F401 (_SEG1: the notification format, for tests)
                         _ACK_SHARE, _F_IMM, _F_NO_ACK, _HOT_S, _IDLE_S, _NOTE, _OPEN, _PREP_IDLE,
                         _PREP_MAX, _SEG1, EXTRA_HINT, TAG_OPEN, TLS_PRESETS, _address,
                         _check_bounds, _Op, _Prepared, _Remote, agent_name, load_nixl, log,
                         make_agent)
from ._nixl_owner import NixlOwner
from ._tcp import TcpTransport


class NixlTransport(NixlOwner, Transport):
    """Ops over a NIXL agent. Options (``Engine(nixl={...})``):

    ``backend``: ``"UCX"`` (default) or ``"LIBFABRIC"`` (EFA). ``tls``: UCX_TLS value or a
    preset (``"shm"``, ``"tcp"``); None keeps UCX's choice (all transports incl. RDMA).
    ``net_devices``: UCX_NET_DEVICES, the NICs UCX may use (``"mlx5_0:1,mlx5_1:1"``; ``"lo"``
    for loopback tests). ``backend_params``: passed to NIXL's ``create_backend`` (e.g.
    ``{"num_workers": "2"}``). ``progress_thread``: NIXL's own progress thread (busy polls;
    off by default). ``module``: which NIXL wheel to import (``"nixl_cu12"``...).
    ``ucx_modules``: UCX_MODULES (default with a ``tls`` preset: ``"^ib,rdmacm"``).
    ``open_timeout``: seconds to wait for a region-open answer. ``confirm``: True (default)
    completes an op when the owner has checked it and acknowledged; False completes it when
    NIXL reports the transfer done, like raw RDMA (one notification fewer per op; the owner
    still checks each op and counts its immediate only if it passes, but a refusal after
    the open is only logged at the owner, not raised at the initiator).
    """

    name = "nixl"
    one_sided = True

    def __init__(self, tcp: TcpTransport, handler: InboundHandler, engine_id: bytes, *,
                 backend: str = "UCX", tls: str | None = None, net_devices: str | None = None,
                 backend_params: dict[str, str] | None = None, progress_thread: bool = False,
                 module: str | None = None, open_timeout: float = 10.0, confirm: bool = True,
                 ucx_modules: str | None = None, **unknown: Any) -> None:
        if unknown:
            raise ConfigError(f"unknown nixl option(s) {sorted(unknown)}; known: backend, tls, "
                              "net_devices, backend_params, progress_thread, module, open_timeout, "
                              "confirm, ucx_modules")
        self._api = load_nixl(module)
        self.tcp, self.handler, self.backend = tcp, handler, backend
        self.open_timeout = open_timeout
        self.confirm = bool(confirm)
        self._flags = 0 if self.confirm else _F_NO_ACK
        self.agent_name = agent_name(engine_id)
        self._lock = threading.RLock()  # every agent call; NIXL's agent is not thread-safe
        self._agent = make_agent(self._api, self.agent_name, backend, tls, net_devices,
                                 dict(backend_params or {}), progress_thread, ucx_modules)
        self._remotes: dict[tuple[bytes, int, int, bytes], _Remote] = {}
        self._remote_agents: dict[bytes, str] = {}  # peer engine id -> its agent (we loaded)
        self._peer_of_agent: dict[str, bytes] = {}  # agent -> authenticated peer engine id
        self._owned: dict[int, tuple[Any, memoryview]] = {}  # region -> (reg dlist, view)
        self._local: dict[int, tuple[Any, int, memoryview]] = {}  # our regions: reg, address
        self._ops: dict[int, _Op] = {}
        self._prepared: OrderedDict[tuple[Any, ...], _Prepared] = OrderedDict()
        self._retired: list[tuple[Any, memoryview]] = []  # unregistered regions peers opened
        self._opens: dict[int, list[Any]] = {}  # request id -> [event, reply]
        self._openers: dict[int, dict[bytes, EngineAddress]] = {}  # our region -> its openers
        self._revoking: dict[int, tuple[bytes, threading.Event]] = {}
        self._revoked: OrderedDict[tuple[bytes, int], None] = OrderedDict()  # peers' regions
        self.revoke_timeout = tcp.connect_timeout
        self._tainted: set[int] = set()  # our regions opened by a peer since forgotten
        self._req_ids = itertools.count(1)
        self._work: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        tcp.on_peer_forgotten.append(self.forget_peer)
        self._threads = [threading.Thread(target=self._progress, name="tf-nixl-progress",
                                           daemon=True),
                         threading.Thread(target=self._serve, name="tf-nixl-control",
                                          daemon=True)]
        for th in self._threads:
            th.start()

    # -- routing ------------------------------------------------------------------------

    def reaches(self, peer: EngineAddress, desc: RegionDescriptor | None) -> bool:
        # a read-only region is not served over NIXL (its memory keys would allow writes):
        # reads of it go over tcp or shm
        return ("nixl" in peer.transports and not self._closed
                and (desc is None or bool(desc.access & Access.REMOTE_WRITE)))

    # -- memory ---------------------------------------------------------------------------

    def _register(self, view: memoryview) -> Any:
        arr = np.frombuffer(view, dtype=np.uint8)
        with self._lock:
            return self._agent.register_memory([(arr.ctypes.data, max(arr.nbytes, 1), 0, "")],
                                               "DRAM", [self.backend])

    def _deregister(self, reg: Any) -> None:
        try:
            with self._lock:
                self._agent.deregister_memory(reg, [self.backend])
        except Exception as exc:  # nothing to hand back; the agent frees it on close
            log.debug("nixl: deregister failed: %s", exc)

    def _source(self, view: memoryview, keep: list[Any]) -> int | None:
        """Make ``view`` usable as the local side of a transfer. Memory inside a region of this
        engine is registered once (until unregistered; returns that region's id); any other
        buffer for the one op (returns None)."""
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        end = addr + view.nbytes
        regions = getattr(self.handler, "_regions", {})
        for rid, region in list(regions.items()):
            rv = region._view
            if rv is None or rv.nbytes < view.nbytes:
                continue
            with self._lock:
                hit = self._local.get(rid)
                if hit is None or hit[2] is not rv:
                    base = np.frombuffer(rv, dtype=np.uint8).ctypes.data
                    if not (base <= addr and end <= base + rv.nbytes):
                        continue
                    hit = self._local[rid] = (self._register(rv), base, rv)
                if hit[1] <= addr and end <= hit[1] + rv.nbytes:
                    return rid
        keep.append(("reg", self._register(view)))
        return None

    # -- opening a peer's region (initiator) ----------------------------------------------

    def _open(self, peer: EngineAddress, desc: RegionDescriptor, need: Access) -> _Remote:
        key = (peer.engine_id, desc.region_id, int(need), desc.key)
        hit = self._remotes.get(key)
        if hit is not None:
            return hit
        if self._closed:
            raise ClosedError("engine closed")
        rid = next(self._req_ids)
        slot: list[Any] = [threading.Event(), None]
        self._opens[rid] = slot
        with self._lock:
            md = self._agent.get_partial_agent_metadata(
                self._api.nixlBind.nixlRegDList(self._api.nixlBind.DRAM_SEG), True,
                [self.backend])
        body = _OPEN.pack(b"tfNO", rid, desc.region_id, int(need), desc.key, len(md)) + md
        self._control(peer, TAG_OPEN, body)
        try:
            if not slot[0].wait(self.open_timeout):
                raise BrokenError(f"peer {peer} did not answer a NIXL region-open in "
                                  f"{self.open_timeout:.0f} s", peer=str(peer))
        finally:
            self._opens.pop(rid, None)
        status, text, base, nbytes, rmd = slot[1]
        if status != w.Status.OK:
            raise status_error(status, text, str(peer), desc.region_id)
        with self._lock:
            name = self._agent.add_remote_agent(rmd)
            name = name.decode() if isinstance(name, bytes) else name
            if name != agent_name(peer.engine_id):
                self._agent.remove_remote_agent(name)
                raise AccessError(f"peer {peer} answered with NIXL agent {name!r}, not its own",
                                  peer=str(peer))
            self._remote_agents[peer.engine_id] = name
            self._peer_of_agent[name] = peer.engine_id
            if (peer.engine_id, desc.region_id) in self._revoked:  # revoked while answering
                raise AccessError(f"region {desc.region_id} of peer {peer} was unregistered",
                                  peer=str(peer), region=desc.region_id)
            # threads that opened the region at once share the first answer (and so the
            # transfer requests prepared against it)
            return self._remotes.setdefault(key, _Remote(name, base, nbytes))

    def _control(self, peer: EngineAddress, tag: int, body: bytes) -> Transfer:
        t = Transfer("nixl-control", len(body), peer=str(peer))
        wop = WireOp(next(self.tcp.op_ids), t, str(peer))
        self.tcp.submit(peer, [simple_chunk(wop, w.Op.SEND, imm=tag, payload=body)])
        return t

    def write(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src: memoryview,
              src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
              imm: int | None) -> None:
        remote = self._open(peer, desc, Access.REMOTE_WRITE)
        flags = self._flags | (_F_IMM if imm is not None else 0)
        head = _NOTE.pack(b"tfNN", wop.op_id, desc.region_id, int(Access.REMOTE_WRITE), flags,
                          imm or 0, desc.key)
        op = _Op(wop, peer, desc.region_id, keep=[src])
        base = _address(src)
        shape = ("WRITE", id(remote), base, src_off.tobytes(), dst_off.tobytes(),
                 lengths.tobytes())
        prep = self._prepared.get(shape)
        if prep is not None and prep.remote is remote:  # checked when it was prepared
            self._post(op, remote, head + prep.tail, prep)
            return
        _check_bounds(remote, desc, dst_off, lengths, peer)
        table = w.segments_table(dst_off, lengths)
        live = lengths > 0
        if not live.any():
            self._post(op, remote, head + table)
            return
        rid = self._source(src, op.keep)
        n = lengths[live]
        local = np.stack([src_off[live] + np.uint64(base), n, np.zeros_like(n)], axis=1)
        far = np.stack([dst_off[live] + np.uint64(remote.base), n, np.zeros_like(n)], axis=1)
        prep = self._prepare(shape, _Prepared(remote, rid, "WRITE", local, far, table))
        self._post(op, remote, head + table, prep)

    def read(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src_offset: int,
             dst: memoryview) -> None:
        remote = self._open(peer, desc, Access.REMOTE_READ)
        head = _NOTE.pack(b"tfNN", wop.op_id, desc.region_id, int(Access.REMOTE_READ),
                          self._flags, 0, desc.key)
        op = _Op(wop, peer, desc.region_id, keep=[dst])
        base = _address(dst)
        shape = ("READ", id(remote), base, src_offset, dst.nbytes)
        prep = self._prepared.get(shape)
        if prep is not None and prep.remote is remote:  # checked when it was prepared
            self._post(op, remote, head + prep.tail, prep)
            return
        n = np.array([dst.nbytes], np.uint64)
        off = np.array([src_offset], np.uint64)
        _check_bounds(remote, desc, off, n, peer)
        table = w.segments_table(off, n)
        if not dst.nbytes:
            self._post(op, remote, head + table)
            return
        rid = self._source(dst, op.keep)
        local = np.array([[base, dst.nbytes, 0]], np.uint64)
        far = np.array([[remote.base + src_offset, dst.nbytes, 0]], np.uint64)
        prep = self._prepare(shape, _Prepared(remote, rid, "READ", local, far, table))
        self._post(op, remote, head + table, prep)

    def _prepare(self, shape: tuple[Any, ...], prep: _Prepared) -> _Prepared:
        """Keep ``prep`` for reposting if its local side is a registered region."""
        if prep.local_rid is None:
            prep.live = False
            return prep
        with self._lock:
            old = self._prepared.pop(shape, None)
            if old is not None:
                self._drop_prepared(old)
            self._prepared[shape] = prep
            while len(self._prepared) > _PREP_MAX:
                self._drop_prepared(self._prepared.popitem(last=False)[1])
        return prep

    def _drop_prepared(self, prep: _Prepared) -> None:
        """(under the lock) Release ``prep``'s idle requests; busy ones go when their op ends."""
        prep.live = False
        for handle in prep.idle:
            try:
                handle.release()
            except Exception as exc:
                log.debug("nixl: release: %s", exc)
        prep.idle.clear()

    def _unprepare(self, which: Callable[[_Prepared], bool]) -> None:
        with self._lock:
            for shape in [k for k, p in self._prepared.items() if which(p)]:
                self._drop_prepared(self._prepared.pop(shape))

    def _post(self, op: _Op, remote: _Remote, note: bytes, prep: _Prepared | None = None) -> None:
        """Post ``op``: a transfer of ``prep``'s descriptors (a kept request when one is idle)
        whose completion sends ``note`` to the owner, or, without ``prep``, only ``note``."""
        op.wop.remaining = 1
        self._ops[op.wop.op_id] = op
        try:
            with self._lock:
                if remote.revoked:  # the owner unregistered it (see _on_revoke)
                    raise AccessError(f"region {op.region} of peer {op.peer} was unregistered",
                                      peer=str(op.peer), region=op.region)
                if prep is None:
                    self._agent.send_notif(remote.agent, note)
                    op.xfer_done = True
                else:
                    op.prep = prep
                    carried = note  # a write's note follows its bytes (NIXL sends it after them)
                    if prep.kind == "READ":  # a read's goes first: the owner checks it while
                        self._agent.send_notif(remote.agent, note)  # the bytes move
                        carried = b""
                    if prep.idle:
                        op.handle = prep.idle.pop()
                    else:
                        ld = self._agent.get_xfer_descs(prep.local, "DRAM")
                        rd = self._agent.get_xfer_descs(prep.far, "DRAM")
                        op.handle = self._agent.initialize_xfer(prep.kind, ld, rd, remote.agent,
                                                                carried, [self.backend])
                    started = time.perf_counter()
                    state = self._agent.transfer(op.handle, carried)  # this op's note
                    took = time.perf_counter() - started
                    if state == "ERR":
                        raise BrokenError(f"NIXL refused to post the {prep.kind.lower()}")
                    op.xfer_done = state == "DONE"
        except Exception as exc:
            self._ops.pop(op.wop.op_id, None)
            self._release(op)
            if isinstance(exc, TensorFabricError):
                raise
            self._drop_peer(op.peer.engine_id)  # e.g. the owner deregistered: reopen next time
            raise BrokenError(f"NIXL could not start the transfer to {op.peer}: {exc}",
                              peer=str(op.peer)) from exc
        if op.xfer_done:  # done while posting (UCX shm copies in place)
            if self.confirm and op.handle is not None:
                self._await_ack(op, took)
            self._complete(op.wop.op_id, op)
        self._wake.set()

    def _await_ack(self, op: _Op, took: float) -> None:
        """The bytes moved while posting: poll for the owner's answer here a little while (at
        most ``_ACK_SHARE`` of the time the post took), which spares two thread wake-ups
        (progress thread, then the waiter) when it comes in time."""
        until = time.perf_counter() + took * _ACK_SHARE
        while True:
            self._poll_notes()
            if op.ack is not None or time.perf_counter() >= until:
                return
            os.sched_yield()

    # -- progress -------------------------------------------------------------------------

    def _progress(self) -> None:
        hot_until = 0.0
        while not self._closed:
            try:
                active = self._poll_once()
            except Exception:
                log.exception("nixl: progress loop error")
                active = False
            now = time.monotonic()
            if active or self._ops:
                # stay hot a while: over UCX tcp the owner must poll for bytes to arrive at all
                hot_until = now + _HOT_S
            if now < hot_until:
                os.sched_yield()  # cores are shared with the peer: let it run between polls
            else:
                self._wake.wait(_IDLE_S)
                self._wake.clear()

    def _poll_notes(self) -> bool:
        """Handle the notifications that came in (from any thread: each is handed out once)."""
        with self._lock:
            notes = self._agent.get_new_notifs()
        for agent, msgs in notes.items():
            name = agent.decode() if isinstance(agent, bytes) else agent
            for msg in msgs:
                self._on_note(name, bytes(msg))
        return bool(notes)

    def _poll_once(self) -> bool:
        active = self._poll_notes()
        for op_id, op in list(self._ops.items()):
            if not op.xfer_done and op.handle is not None:
                try:
                    with self._lock:
                        state = self._agent.check_xfer_state(op.handle)
                except Exception as exc:
                    state = "ERR"
                    log.debug("nixl: transfer state: %s", exc)
                if state == "ERR":
                    self._finish(op_id, BrokenError(f"NIXL transfer to {op.peer} failed",
                                                    peer=str(op.peer)))
                    self._drop_peer(op.peer.engine_id)
                    continue
                op.xfer_done = state == "DONE"
                active = True
            if op.wop.dead and (op.xfer_done or op.handle is None):
                if self._ops.pop(op_id, None) is not None:  # timed out or cancelled: NIXL is
                    self._release(op)                       # done with the memory
                continue
            self._complete(op_id, op)
        return active

    def _complete(self, op_id: int, op: _Op) -> None:
        if op.xfer_done and (op.ack is not None or not self.confirm):
            status, text = op.ack or (w.Status.OK, "")
            err = None if status == w.Status.OK else status_error(status, text, str(op.peer),
                                                                  op.region)
            self._finish(op_id, err)

    def _finish(self, op_id: int, err: BaseException | None) -> None:
        op = self._ops.pop(op_id, None)
        if op is None:
            return
        self._release(op)
        if err is None:
            op.wop.chunk_replied(w.Status.OK, "", op.region)
        else:
            op.wop.transfer._fail(err)

    def _release(self, op: _Op) -> None:
        handle, prep, op.handle = op.handle, op.prep, None
        if handle is not None:
            try:
                with self._lock:
                    if (prep is not None and prep.live and op.xfer_done and not self._closed
                            and len(prep.idle) < _PREP_IDLE):
                        prep.idle.append(handle)  # done: NIXL may post it again
                    else:
                        handle.release()
            except Exception as exc:
                log.debug("nixl: release: %s", exc)
        for item in op.keep:
            if isinstance(item, tuple) and item[0] == "reg":
                self._deregister(item[1])
        op.keep.clear()

    def _serve(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("nixl: control job failed")

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._work.put(None)
        self._wake.set()
        for th in self._threads:
            th.join(timeout=5)
        err = ClosedError("engine closed")
        for op_id in list(self._ops):
            self._finish(op_id, err)
        for slot in list(self._opens.values()):
            slot[1] = (w.Status.ERROR, "engine closed", 0, 0, b"")
            slot[0].set()
        self._unprepare(lambda p: True)
        with self._lock:
            for name in list(self._remote_agents.values()):
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:
                    pass
            regs = [o[0] for o in self._owned.values()] + [o[0] for o in self._retired]
            for reg in regs + [x[0] for x in self._local.values()]:
                self._deregister(reg)
            self._owned.clear()
            self._retired.clear()
            self._local.clear()
            self._remote_agents.clear()
            self._agent = None


__all__ = ["NixlTransport", "load_nixl", "EXTRA_HINT", "TLS_PRESETS"]
