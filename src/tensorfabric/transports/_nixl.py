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
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import _wire as w
from .._address import EngineAddress
from .._errors import AccessError, BrokenError, ClosedError, ConfigError, TensorFabricError
from .._ops import WireOp, simple_chunk, status_error
from .._region import Access, RegionDescriptor
from .._transfer import Transfer
from ._base import InboundHandler, Transport
from ._tcp import TcpTransport

log = logging.getLogger("tensorfabric.nixl")

EXTRA_HINT = ("install the nixl extra: pip install 'tensorfabric[nixl]' "
              "(CPU-only machines: pip install --no-deps nixl-cu13==1.5.1)")
#: UCX_TLS presets. tcp stays in "shm" because NIXL asks UCX for peer-failure detection,
#: which UCX's shared-memory transports lack for its control messages.
TLS_PRESETS = {"shm": "sm,tcp,self", "tcp": "tcp,self"}

TAG_OPEN = 0xFFFF_FFFF_4E49_0001  # control tags (>= engine CONTROL_TAG_BASE)
TAG_OPEN_REPLY = 0xFFFF_FFFF_4E49_0002
_OPEN = struct.Struct("<4sQQB16sI")  # magic, request id, region, need, key, metadata length
_REPLY = struct.Struct("<4sQBQQII")  # magic, request id, status, address, nbytes, text len, md len
_NOTE = struct.Struct("<4sQQBBQ16s")  # magic, op id, region, need, flags, imm, key (+ table)
_F_IMM, _F_NO_ACK = 1, 2
_ACK = struct.Struct("<4sQB")  # magic, op id, status (+ text)
_SEG1 = struct.Struct("<QQ")  # one entry of a segment table (w.SEG_DTYPE): offset, length
_NO_SEGS = np.zeros(0, dtype=w.SEG_DTYPE)
_env_lock = threading.Lock()
_HOT_S = 0.5  # keep polling without sleeping this long after the last sign of traffic
_IDLE_S = 0.0005  # then sleep this long between polls
_PREP_MAX = 64  # op shapes whose transfer requests are kept for reposting
_ACK_SHARE = 0.05  # an op done while posting waits for its acknowledgement this share longer
_PREP_IDLE = 2  # idle requests kept per shape (more are made while ops overlap)


def load_nixl(module: str | None = None) -> Any:
    """NIXL's Python API module. Tries the CUDA-specific wheels first (importing the ``nixl``
    meta package may import torch to pick one)."""
    names = [module] if module else ["nixl_cu13", "nixl_cu12", "nixl"]
    err: Exception | None = None
    for name in names:
        try:
            api = importlib.import_module(f"{name}._api")
        except ImportError as exc:
            err = exc
            continue
        for logger in (name, f"{name}._api", "nixl"):  # NIXL logs every agent start at INFO
            logging.getLogger(logger).setLevel(logging.WARNING)
        return api
    raise ImportError(f"the nixl transport needs NVIDIA NIXL: {EXTRA_HINT}") from err


def agent_name(engine_id: bytes) -> str:
    return "tf-" + engine_id.hex()


@dataclass
class _Remote:
    agent: str
    base: int
    nbytes: int


@dataclass(eq=False)
class _Prepared:
    """One op shape: its descriptor lists and the idle NIXL transfer requests made from them.
    ``local_rid`` is the region of this engine whose registration the local side lies in;
    None (a per-op registration) is never kept."""
    remote: _Remote
    local_rid: int | None
    kind: str
    local: np.ndarray
    far: np.ndarray
    tail: bytes  # the segment table every op's notification carries
    idle: list[Any] = field(default_factory=list)
    live: bool = True  # False once dropped: requests then are released, not kept


@dataclass
class _Op:
    wop: WireOp
    peer: EngineAddress
    region: int
    handle: Any = None  # None: notification-only op (no bytes)
    prep: _Prepared | None = None  # where the handle came from (and goes back to)
    xfer_done: bool = False
    ack: tuple[int, str] | None = None
    keep: list[Any] = field(default_factory=list)  # views and per-op registrations


class NixlTransport(Transport):
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
        self._agent = self._make_agent(tls, net_devices, dict(backend_params or {}),
                                       progress_thread, ucx_modules)
        self._remotes: dict[tuple[bytes, int, int, bytes], _Remote] = {}
        self._remote_agents: dict[bytes, str] = {}  # peer engine id -> its agent (we loaded)
        self._peer_of_agent: dict[str, bytes] = {}  # agent -> authenticated peer engine id
        self._owned: dict[int, tuple[Any, memoryview]] = {}  # region -> (reg dlist, view)
        self._local: dict[int, tuple[Any, int, memoryview]] = {}  # our regions: reg, address
        self._ops: dict[int, _Op] = {}
        self._prepared: OrderedDict[tuple[Any, ...], _Prepared] = OrderedDict()
        self._retired: list[tuple[Any, memoryview]] = []  # unregistered regions peers opened
        self._opens: dict[int, list[Any]] = {}  # request id -> [event, reply]
        self._req_ids = itertools.count(1)
        self._work: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._threads = [threading.Thread(target=self._progress, name="tf-nixl-progress",
                                           daemon=True),
                         threading.Thread(target=self._serve, name="tf-nixl-control",
                                          daemon=True)]
        for th in self._threads:
            th.start()

    def _make_agent(self, tls: str | None, net_devices: str | None, params: dict[str, str],
                    progress_thread: bool, ucx_modules: str | None) -> Any:
        api = self._api
        env = {}
        if tls:
            env["UCX_TLS"] = TLS_PRESETS.get(tls, tls)
        if net_devices:
            env["UCX_NET_DEVICES"] = net_devices
        if ucx_modules is None and tls in TLS_PRESETS and "UCX_MODULES" not in os.environ:
            # no InfiniBand needed: skip UCX's ib module, whose bundled libnl-route crashes
            # the process at exit (nixl-cu13 1.5.1, seen on machines without RDMA NICs)
            ucx_modules = "^ib,rdmacm"
        if ucx_modules:
            env["UCX_MODULES"] = ucx_modules
        # NIXL's own locking too: UCX may report a failed peer from its async thread
        cfg = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=[],
                                    sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        with _env_lock:  # UCX reads its settings from the environment when the backend starts
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                agent = api.nixl_agent(self.agent_name, cfg)
                if self.backend not in agent.get_plugin_list():
                    raise ConfigError(f"NIXL has no {self.backend} plugin here (available: "
                                      f"{agent.get_plugin_list()})")
                agent.create_backend(self.backend, params)
            except TensorFabricError:
                raise
            except Exception as exc:
                hint = ("its plugin needs libfabric.so.1 (EFA installer), libhwloc.so.15 and "
                        "libcuda.so.1 on the library path" if self.backend == "LIBFABRIC" else
                        "check the tls and net_devices options")
                raise ConfigError(f"NIXL could not start its {self.backend} backend ({exc}): "
                                  f"{hint}; see docs/troubleshooting/nixl.md") from exc
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return agent

    # -- routing ------------------------------------------------------------------------

    def reaches(self, peer: EngineAddress, desc: RegionDescriptor | None) -> bool:
        return "nixl" in peer.transports and not self._closed

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

    def forget_region(self, region: int) -> None:
        """The engine unregistered ``region``. Peers that opened it keep its metadata, and
        deregistering memory under them crashed NIXL 1.5.1's initiator (a segfault in
        createXferReq), so the registration and the buffer are retired, not freed, until
        the engine closes. The owner refuses every later op on the region."""
        with self._lock:
            self._unprepare(lambda p: p.local_rid == region)  # before the memory goes
            owned = self._owned.pop(region, None)
            local = self._local.pop(region, None)
            if owned is not None:
                self._retired.append(owned)
        if local is not None:
            self._deregister(local[0])  # our own sources: no peer holds their metadata

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
            # threads that opened the region at once share the first answer (and so the
            # transfer requests prepared against it)
            return self._remotes.setdefault(key, _Remote(name, base, nbytes))

    def _control(self, peer: EngineAddress, tag: int, body: bytes) -> None:
        t = Transfer("nixl-control", len(body), peer=str(peer))
        wop = WireOp(next(self.tcp.op_ids), t, str(peer))
        self.tcp.submit(peer, [simple_chunk(wop, w.Op.SEND, imm=tag, payload=body)])

    def on_control(self, peer: EngineAddress, tag: int, data: bytes) -> tuple[int, str]:
        """A control message from an authenticated peer (called from a tcp thread)."""
        if tag == TAG_OPEN:
            self._work.put(lambda: self._answer_open(peer, data))
        elif tag == TAG_OPEN_REPLY and len(data) >= _REPLY.size:
            magic, rid, status, base, nbytes, tlen, mlen = _REPLY.unpack_from(data)
            slot = self._opens.get(rid)
            if slot is not None and magic == b"tfNR":
                text = data[_REPLY.size:_REPLY.size + tlen].decode(errors="replace")
                slot[1] = (status, text, base, nbytes, data[_REPLY.size + tlen:])
                slot[0].set()
        else:
            return w.Status.ERROR, "malformed nixl control message"
        return w.Status.OK, ""

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
                md = self._agent.get_partial_agent_metadata(owned[0], True, [self.backend])
        except Exception as exc:
            log.warning("nixl: open of region %d for %s failed: %s", region, peer, exc)
            return w.Status.ERROR, f"NIXL failed to register the region: {exc}", 0, 0, b""
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        return w.Status.OK, "", addr, view.nbytes, md

    # -- ops (initiator) ------------------------------------------------------------------

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


def _address(view: memoryview) -> int:
    try:  # ctypes is cheaper than numpy here, but needs a writable buffer of >= 1 byte
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _check_bounds(remote: _Remote, desc: RegionDescriptor, off: np.ndarray, n: np.ndarray,
                  peer: EngineAddress) -> None:
    """Against the size the owner reported, not the (forgeable) descriptor's."""
    if len(n) and bool(np.any(off + n > np.uint64(remote.nbytes))):
        raise AccessError(f"access outside peer {peer}'s {remote.nbytes}-byte region "
                          f"{desc.region_id}", peer=str(peer), region=desc.region_id)


__all__ = ["NixlTransport", "load_nixl", "EXTRA_HINT", "TLS_PRESETS"]
