"""The engine's operations: what a caller asks of a peer (write, read, send, ...).

A mixin of :class:`~._engine.Engine`: each public method validates its arguments, builds the
:class:`~._transfer.Transfer` the caller waits on and hands wire ops to the transport that
reaches the peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Sequence

import numpy as np

from . import _wire as w
from ._address import EngineAddress
from ._buffers import Buffer, as_bytes_view
from ._checks import _check_dst_range, _check_range, _imm, _index_array, _nonneg
from ._errors import AccessError, ClosedError, ConfigError, TensorFabricError
from ._ops import WireOp, coalesce, one_frame, simple_chunk
from ._region import Access, MemoryRegion, RegionDescriptor
from ._transfer import Transfer

if TYPE_CHECKING:
    from .transports._base import Transport
    from .transports._tcp import TcpTransport


_REMOTE_WRITE = int(Access.REMOTE_WRITE)


class ScatterDest(NamedTuple):
    """One destination of :meth:`Engine.scatter`."""

    dst: RegionDescriptor
    src_offset: int
    dst_offset: int
    nbytes: int


class EngineOps:
    """Mixin of :class:`~._engine.Engine`: the operations on peers' memory and messages."""

    _tcp: TcpTransport
    _closed: bool
    _addresses: dict[bytes, EngineAddress]
    #: no shm and no nixl transport: every op goes over tcp (set by Engine)
    _tcp_only: bool

    if TYPE_CHECKING:  # provided by Engine and Timers
        def _check_open(self) -> None: ...
        def _peer(self, address: bytes) -> EngineAddress: ...
        def _transport_for(self, peer: EngineAddress, desc: RegionDescriptor) -> Transport: ...
        def _new_transfer(self, kind: str, nbytes: int, parts: int, timeout: float | None,
                          peer: str | None) -> Transfer: ...

    def write(self, src: MemoryRegion | Buffer, dst: RegionDescriptor | bytes, *,
              src_offset: int = 0, dst_offset: int = 0, nbytes: int | None = None,
              imm: int | None = None, timeout: float | None = None) -> Transfer:
        """Write ``nbytes`` of ``src`` (default: the rest of it) into the peer's region.

        With ``imm``, the peer's ``expect(imm)`` counts this write once it has fully landed.
        """
        if self._closed:
            raise ClosedError("engine is closed")
        view = src.view if isinstance(src, MemoryRegion) else as_bytes_view(src, writable=False)
        desc = dst if isinstance(dst, RegionDescriptor) else RegionDescriptor.from_bytes(dst)
        if not int(desc.access) & _REMOTE_WRITE:
            self._descriptor(desc, Access.REMOTE_WRITE)  # raises the access error
        if nbytes is None:
            nbytes = view.nbytes - (src_offset if type(src_offset) is int and src_offset >= 0
                                    else _nonneg("src_offset", src_offset))
        # plain non-negative ints within both buffers (every small write) pass in one test;
        # anything else gets the full checks and their errors
        if not (type(src_offset) is int and type(dst_offset) is int and type(nbytes) is int
                and src_offset >= 0 and dst_offset >= 0 and nbytes >= 0
                and src_offset + nbytes <= view.nbytes and dst_offset + nbytes <= desc.nbytes):
            _check_range("source", src_offset, nbytes, view.nbytes)
            _check_dst_range(desc, dst_offset, nbytes)
            src_offset, dst_offset, nbytes = int(src_offset), int(dst_offset), int(nbytes)
        peer = self._addresses.get(desc.owner) or self._peer(desc.owner)
        value = None if imm is None else _imm(imm)
        tcp = self._tcp
        via = tcp if self._tcp_only else self._transport_for(peer, desc)
        label = peer._label
        if nbytes > tcp.chunk_bytes or via is not tcp:
            t = self._new_transfer("write", nbytes, 1, timeout, label)
            try:
                via.write_one(peer, desc, WireOp(next(tcp.op_ids), t, label), view, src_offset,
                              dst_offset, nbytes, value)
            except TensorFabricError as exc:
                t._fail(exc)
            return t
        # the small-op path: no numpy, one frame built straight from Python ints
        t = self._new_transfer("write", nbytes, 1, timeout, label)
        try:
            tcp.peer_links(peer).submit([one_frame(
                WireOp(next(tcp.op_ids), t, label), w.Op.WRITE, desc.region_id, desc.key, value,
                view, src_offset, dst_offset, nbytes)])
        except TensorFabricError as exc:
            t._fail(exc)
        return t

    def write_pages(self, src: MemoryRegion | Buffer, dst: RegionDescriptor | bytes, *,
                    src_pages: Sequence[int] | np.ndarray, dst_pages: Sequence[int] | np.ndarray,
                    page_size: int, src_stride: int | None = None, dst_stride: int | None = None,
                    src_offset: int = 0, dst_offset: int = 0, imm: int | None = None,
                    timeout: float | None = None) -> Transfer:
        """Copy pages: page ``i`` is ``page_size`` bytes from ``src_offset + src_pages[i] *
        src_stride`` to ``dst_offset + dst_pages[i] * dst_stride`` (strides default to
        ``page_size``). Adjacent pages are merged and pages are batched into few frames."""
        view = self._src_view(src)
        desc = self._descriptor(dst, Access.REMOTE_WRITE)
        sp = _index_array("src_pages", src_pages)
        dp = _index_array("dst_pages", dst_pages)
        if len(sp) != len(dp):
            raise ConfigError(f"src_pages has {len(sp)} entries but dst_pages has {len(dp)}")
        if not isinstance(page_size, (int, np.integer)) or page_size <= 0:
            raise ConfigError(f"page_size must be a positive int, got {page_size!r}")
        page_size = int(page_size)
        ss = page_size if src_stride is None else _nonneg("src_stride", src_stride)
        ds = page_size if dst_stride is None else _nonneg("dst_stride", dst_stride)
        src_base, dst_base = _nonneg("src_offset", src_offset), _nonneg("dst_offset", dst_offset)
        if len(sp):
            # the furthest page, in Python integers: no uint64 wraparound can sneak past
            _check_range("source pages", src_base + int(sp.max()) * ss, page_size, view.nbytes)
            _check_dst_range(desc, dst_base + int(dp.max()) * ds, page_size)
        so = np.uint64(src_base) + sp * np.uint64(ss)
        do = np.uint64(dst_base) + dp * np.uint64(ds)
        so, do, lens = coalesce(so, do, page_size)
        return self._write(desc, view, so, do, lens, _imm(imm), timeout, "write_pages")

    def scatter(self, src: MemoryRegion | Buffer, dests: Iterable[ScatterDest | tuple[Any, ...]],
                *, imm: int | None = None, timeout: float | None = None) -> Transfer:
        """Write pieces of one source to many destinations; ``imm`` is counted once per entry."""
        view = self._src_view(src)
        items = [ScatterDest(*d) for d in dests]
        plans = []
        for d in items:
            desc = self._descriptor(d.dst, Access.REMOTE_WRITE)
            _check_range("source", d.src_offset, d.nbytes, view.nbytes)
            _check_dst_range(desc, d.dst_offset, d.nbytes)
            plans.append(desc)
        total = sum(d.nbytes for d in items)
        t = self._new_transfer("scatter", total, len(items), timeout, None)
        for d, desc in zip(items, plans):
            self._start_write(t, desc, view, np.array([d.src_offset], np.uint64),
                              np.array([d.dst_offset], np.uint64), np.array([d.nbytes], np.uint64),
                              _imm(imm))
        return t

    def barrier(self, peers: Iterable[bytes | RegionDescriptor], imm: int, *,
                timeout: float | None = None) -> Transfer:
        """Send the immediate ``imm`` (no data) to each peer; done when all have counted it."""
        addrs = [self._peer(p.owner if isinstance(p, RegionDescriptor) else p) for p in peers]
        value = _imm(imm)
        if value is None:
            raise ConfigError("barrier needs an immediate value")
        t = self._new_transfer("barrier", 0, len(addrs), timeout, None)
        for addr in addrs:
            wop = WireOp(next(self._tcp.op_ids), t, str(addr))
            self._submit_control(t, addr, simple_chunk(wop, w.Op.IMM, imm=value))
        return t

    def read(self, src: RegionDescriptor | bytes, dst: MemoryRegion | Buffer, *,
             src_offset: int = 0, dst_offset: int = 0, nbytes: int | None = None,
             timeout: float | None = None) -> Transfer:
        """One-sided get: copy ``nbytes`` of the peer's region into local memory ``dst``."""
        desc = self._descriptor(src, Access.REMOTE_READ)
        out = dst.view if isinstance(dst, MemoryRegion) else as_bytes_view(dst, writable=True)
        if nbytes is None:
            nbytes = out.nbytes - _nonneg("dst_offset", dst_offset)
        _check_range("destination", dst_offset, nbytes, out.nbytes)
        if _nonneg("src_offset", src_offset) + nbytes > desc.nbytes:
            raise AccessError(f"read of {nbytes} bytes at {src_offset} is outside the peer's "
                              f"{desc.nbytes}-byte region", region=desc.region_id,
                              offset=src_offset, nbytes=nbytes)
        peer = self._peer(desc.owner)
        t = self._new_transfer("read", nbytes, 1, timeout, str(peer))
        wop = WireOp(next(self._tcp.op_ids), t, str(peer))
        target = out[dst_offset:dst_offset + nbytes]
        try:
            self._transport_for(peer, desc).read(peer, desc, wop, src_offset, target)
        except TensorFabricError as exc:
            t._fail(exc)
        return t

    def send(self, peer: bytes | RegionDescriptor, data: Buffer, *, tag: int = 0,
             timeout: float | None = None) -> Transfer:
        """Send a small message (at most 64 MiB) that the peer takes with ``recv(tag=...)``."""
        addr = self._peer(peer.owner if isinstance(peer, RegionDescriptor) else peer)
        payload = as_bytes_view(data, writable=False) if not isinstance(data, bytes) else data
        if len(payload) > w.MAX_MESSAGE:
            raise ConfigError(f"message of {len(payload)} bytes exceeds {w.MAX_MESSAGE}; "
                              "register a region and use write() for bulk data")
        tagv = _imm(tag)
        t = self._new_transfer("send", len(payload), 1, timeout, str(addr))
        wop = WireOp(next(self._tcp.op_ids), t, str(addr))
        self._submit_control(t, addr, simple_chunk(wop, w.Op.SEND, imm=tagv or 0, payload=payload))
        return t

    # -- internals ------------------------------------------------------------------

    def _src_view(self, src: MemoryRegion | Buffer) -> memoryview:
        self._check_open()
        if isinstance(src, MemoryRegion):
            return src.view
        return as_bytes_view(src, writable=False)

    def _descriptor(self, dst: RegionDescriptor | bytes, need: Access) -> RegionDescriptor:
        self._check_open()
        desc = dst if isinstance(dst, RegionDescriptor) else RegionDescriptor.from_bytes(dst)
        if not int(desc.access) & int(need):  # ints: an IntFlag's & costs ~1 us a call
            what = "write to" if need == Access.REMOTE_WRITE else "read from"
            raise AccessError(f"region {desc.region_id} does not allow peers to {what} it",
                              region=desc.region_id)
        return desc

    def _write(self, desc: RegionDescriptor, view: memoryview, so: np.ndarray, do: np.ndarray,
               lens: np.ndarray, imm: int | None, timeout: float | None, kind: str) -> Transfer:
        peer = self._peer(desc.owner)
        label = peer._label
        t = self._new_transfer(kind, int(lens.sum()) if len(lens) else 0, 1, timeout, label)
        self._start_write(t, desc, view, so, do, lens, imm, label, peer)
        return t

    def _start_write(self, t: Transfer, desc: RegionDescriptor, view: memoryview,
                     so: np.ndarray, do: np.ndarray, lens: np.ndarray, imm: int | None,
                     label: str | None = None, peer: EngineAddress | None = None,
                     via: Transport | None = None) -> None:
        """Hand a write to its transport (``peer`` and ``via``: already looked up)."""
        if peer is None:
            peer = self._peer(desc.owner)
        wop = WireOp(next(self._tcp.op_ids), t, label or peer._label)
        try:
            (via or self._transport_for(peer, desc)).write(peer, desc, wop, view, so, do, lens,
                                                           imm)
        except TensorFabricError as exc:
            t._fail(exc)

    def _submit_control(self, t: Transfer, addr: EngineAddress, chunk: Any) -> None:
        try:
            self._tcp.peer_links(addr).submit([chunk])
        except TensorFabricError as exc:
            t._fail(exc)
