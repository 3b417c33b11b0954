"""The engine: one per process, one API over every transport."""

from __future__ import annotations

import collections
import itertools
import logging
import os
import secrets
import ssl
import threading
import time
import weakref
from typing import Any, Mapping, Sequence

from . import _auth
from ._address import EngineAddress
from ._buffers import Buffer, as_bytes_view
from ._checks import _parse_endpoint
from ._errors import ClosedError, ConfigError, TransferTimeout
from ._engine_ops import EngineOps, ScatterDest
from ._inbound import CONTROL_TAG_BASE, Inbound, Message
from ._timers import Timers
from ._ops import DEFAULT_CHUNK
from ._region import KEY_BYTES, Access, MemoryRegion, RegionDescriptor, ShmBacking
from ._transfer import Transfer
from .transports._base import Transport
from .transports._shm import ShmTransport, host_id
from .transports._tcp import TcpTransport

log = logging.getLogger("tensorfabric")
_REMOTE_READ = int(Access.REMOTE_READ)  # tested per op: an IntFlag's & costs ~1 us a call

__all__ = ["CONTROL_TAG_BASE", "Engine", "Message", "ScatterDest"]


class Engine(EngineOps, Inbound, Timers):
    """Moves bytes between registered memory regions of this and other engines.

    ``secret`` (or ``$TENSORFABRIC_SECRET``) authenticates peers; every engine of a cluster
    needs the same one. ``listen`` names the local addresses to accept links on (one per NIC,
    ``"HOST:PORT"``; default ``host:port``). ``links`` is the number of TCP links this engine
    opens to each peer, or a list of local addresses to bind them to (one link per entry,
    link ``i`` connecting to the peer's ``i``-th listen address). ``transports`` lists the
    transports this engine may use, in order of preference (``"shm"`` is used for same-host
    peers' shared-memory regions, ``"tcp"`` for everything else; ``"nixl"`` adds NVIDIA NIXL
    for peers that have it too, configured by the ``nixl`` options, see ``docs/nixl.md``).
    ``timeout`` is the default deadline (seconds) of every operation. Unread messages take at
    most ``inbox_bytes`` in all and ``inbox_peer_bytes`` (default: half of it) from one sender,
    so a peer whose messages nobody reads cannot shut the others out.

    Every tcp frame carries a MAC under a key of its link (``integrity``, on by default): a
    relay without the secret cannot change, replay, reorder or splice frames. Turn it off
    (``integrity=False``) only on a fabric you trust, on every engine: it stays on for a link
    if either end wants it. With TLS (``tls_server`` / ``tls_client``) the secret check is bound
    to the TLS channel and TLS carries integrity instead. See ``docs/architecture.md``.
    """

    def __init__(
        self,
        secret: str | bytes | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        listen: Sequence[str | tuple[str, int]] | None = None,
        links: int | Sequence[str | None] = 1,
        transports: Sequence[str] = ("shm", "tcp"),
        timeout: float = 30.0,
        name: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK,
        connect_timeout: float = 5.0,
        link_timeout: float = 3.0,
        reconnect_grace: float = 2.0,
        inbox_bytes: int = 256 << 20,
        inbox_peer_bytes: int | None = None,
        tls_server: ssl.SSLContext | None = None,
        tls_client: ssl.SSLContext | None = None,
        integrity: bool = True,
        nixl: Mapping[str, Any] | None = None,
    ) -> None:
        secret_bytes = _auth.resolve_secret(secret)
        if isinstance(links, int):
            if links < 1:
                raise ConfigError("links must be at least 1")
            link_addrs: list[str | None] = [None] * links
        else:
            link_addrs = list(links)
            if not link_addrs:
                raise ConfigError("links must name at least one local address")
        unknown = set(transports) - {"shm", "tcp", "nixl"}
        if unknown:
            raise ConfigError(f"unknown transport(s) {sorted(unknown)}; known: shm, tcp, nixl")
        self._order = tuple(transports)
        self._told_write_only: set[tuple[bytes, int]] = set()  # logged once each (bounded)
        if timeout <= 0 or chunk_bytes < 4096:
            raise ConfigError("timeout must be > 0 and chunk_bytes at least 4096")
        self.timeout = float(timeout)
        self.name = name or f"engine-{os.getpid()}"
        self._id = secrets.token_bytes(16)
        self._closed = False
        self._lock = threading.Lock()
        self._regions: dict[int, MemoryRegion] = {}
        self._region_ids = itertools.count(1)
        self._imm_lock = threading.Lock()
        self._imm_counts: collections.Counter[int] = collections.Counter()
        self._imm_waiters: dict[int, collections.deque[list[Any]]] = {}
        self._partial: dict[tuple[bytes, int], tuple[float, set[int]]] = {}
        self._partial_per_peer: collections.Counter[bytes] = collections.Counter()
        self._recent: collections.OrderedDict[tuple[bytes, int], None] = collections.OrderedDict()
        self._inbox_lock = threading.Lock()
        self._inbox: dict[int, collections.deque[Message]] = {}
        self._inbox_waiters: dict[int, collections.deque[Transfer]] = {}
        self._inbox_bytes = 0
        self._inbox_limit = inbox_bytes
        self._inbox_share = inbox_bytes // 2 if inbox_peer_bytes is None else inbox_peer_bytes
        self._inbox_peer: collections.Counter[bytes] = collections.Counter()
        # deadlines of pending transfers; weak, so finished ones (and a recv's message) are
        # freed as soon as the caller drops them, not when their deadline passes
        self._timers: list[tuple[float, int, weakref.ref[Transfer]]] = []
        self._timers_new: collections.deque[tuple[float, weakref.ref[Transfer]]] = collections.deque()
        self._timer_seq = itertools.count()
        self._timer_lock = threading.Lock()
        self._timer_cv = threading.Condition(self._timer_lock)
        self._addresses: dict[bytes, EngineAddress] = {}

        endpoints = [_parse_endpoint(e) for e in (listen or [(host, port)])]
        self._tcp = TcpTransport(
            engine_id=self._id, secret=secret_bytes, handler=self, listen=endpoints,
            link_addrs=link_addrs, connect_timeout=connect_timeout, link_timeout=link_timeout,
            reconnect_grace=reconnect_grace, tls_server=tls_server, tls_client=tls_client,
            chunk_bytes=chunk_bytes, integrity=bool(integrity),
        )
        self._blocker = self._tcp.poller.blocker if self._tcp.poller is not None else None
        self._shm: ShmTransport | None = None
        self._probe: ShmBacking | None = None
        probe_nonce = b""
        if "shm" in transports:
            self._probe = ShmBacking(16, "tensorfabric-probe")
            probe_nonce = secrets.token_bytes(16)
            self._probe.map[:16] = probe_nonce
            self._shm = ShmTransport(self._tcp, self._shm_grant, timeout=connect_timeout)
        self._nixl: Any = None
        if "nixl" in transports:
            from .transports._nixl import NixlTransport  # ImportError names the extra

            try:
                self._nixl = NixlTransport(self._tcp, self, self._id, **dict(nixl or {}))
            except BaseException:
                self._tcp.close()
                if self._shm is not None:
                    self._shm.close()
                if self._probe is not None:
                    self._probe.close()
                raise
        self._tcp_only = self._shm is None and self._nixl is None  # every op over tcp
        self._tcp.on_peer_forgotten.append(self._forget_peer)
        self._address = EngineAddress(
            engine_id=self._id, name=self.name, endpoints=tuple(self._tcp.endpoints),
            host_id=host_id(), pid=os.getpid(),
            probe_fd=self._probe.fd if self._probe else -1, probe_nonce=probe_nonce,
            transports=("nixl",) if self._nixl is not None else (),
        )
        self._address_bytes = self._address.to_bytes()
        self._tcp.start(self._address)
        self._timer_thread = threading.Thread(target=self._timer_loop, name="tf-timer",
                                              daemon=True)
        self._timer_thread.start()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **overrides: Any) -> Engine:
        """An engine configured by a TOML, JSON or YAML file (see ``docs/multilink.md``);
        keyword arguments override the file."""
        from pathlib import Path

        from ._config import engine_kwargs, read_config_file

        p = Path(path)
        kwargs = engine_kwargs(read_config_file(p), base=p.parent)
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- identity -------------------------------------------------------------------------

    @property
    def address(self) -> bytes:
        """This engine's address: give it to peers out of band."""
        return self._address_bytes

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return list(self._address.endpoints)

    def __repr__(self) -> str:
        return f"<Engine {self._address}{' closed' if self._closed else ''}>"

    # -- memory ---------------------------------------------------------------------------

    def register(self, buffer: Buffer, access: Access = Access.READ_WRITE) -> MemoryRegion:
        """Register memory for remote access. The buffer must stay alive while registered.

        Accepts numpy arrays (C-contiguous), bytearray, memoryview, and CPU torch tensors.
        """
        self._check_open()
        access = Access(access)
        view = as_bytes_view(buffer, writable=bool(access & Access.REMOTE_WRITE))
        return self._add_region(view, access, buffer, None)

    def alloc(self, nbytes: int, access: Access = Access.READ_WRITE) -> MemoryRegion:
        """A new zeroed region in shared memory, which same-host peers write with one copy."""
        self._check_open()
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ConfigError(f"nbytes must be a non-negative int, got {nbytes!r}")
        access = Access(access)
        shm = ShmBacking(nbytes, f"tensorfabric-{self.name}",
                         read_only_peers=access == Access.REMOTE_READ)
        view = memoryview(shm.map)[:nbytes]
        return self._add_region(view, access, None, shm)

    def _add_region(self, view: memoryview, access: Access, owner: Any,
                    shm: ShmBacking | None) -> MemoryRegion:
        with self._lock:
            rid = next(self._region_ids)
            region = MemoryRegion(self, rid, view, access, secrets.token_bytes(KEY_BYTES), owner, shm)
            self._regions[rid] = region
        return region

    def unregister(self, region: MemoryRegion) -> None:
        """Stop remote access to a region; later accesses by peers fail with AccessError.

        Same-host peers that mapped the region's shared memory are told and drop their
        mappings (this waits, up to ``connect_timeout``, for their copies in flight to end).
        """
        with self._lock:
            if self._regions.get(region.id) is region:
                del self._regions[region.id]
            peers = set(region._shm_peers)
            region._shm_peers.clear()
        if self._nixl is not None:
            self._nixl.forget_region(region.id)
        if peers and self._shm is not None:
            slow = self._shm.grants.revoke(region.id, peers, self._tcp.connect_timeout)
            if slow:
                log.warning("%d peer(s) did not confirm dropping region %d's memory",
                            len(slow), region.id)
        region._release()

    def connect(self, peer: bytes, *, timeout: float | None = None) -> None:
        """Open every link to ``peer`` now and wait until they are up (ops also connect
        lazily, with the first link at once and the others in the background).

        Raises AuthenticationError on a bad secret, BrokenError if the peer cannot be reached,
        TransferTimeout if not every link came up within ``timeout``.
        """
        limit = timeout or self._tcp.connect_timeout
        addr = self._peer(peer)
        links = self._tcp.peer_links(addr)
        links.connect_first(limit)
        deadline = time.monotonic() + limit
        with links.cond:
            while len(links.live()) < len(links.conns):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeout(
                        f"only {len(links.live())} of {len(links.conns)} links to {addr} came "
                        f"up within {limit} s", peer=str(addr))
                links.cond.wait(left)

    def stats(self) -> dict[str, Any]:
        """Bytes sent per link per peer, regions and pending immediates (for tests and tools)."""
        with self._imm_lock:
            imms = dict(self._imm_counts)
        return {"links": self._tcp.link_stats(), "regions": len(self._regions), "imm": imms}

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close links, stop threads, release shared memory. Pending ops fail with ClosedError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            regions = list(self._regions.values())
            self._regions.clear()
        with self._timer_cv:
            self._timer_cv.notify_all()
        if self._nixl is not None:
            self._nixl.close()
        self._tcp.close()
        if self._shm is not None:
            self._shm.close()
        err = ClosedError("engine closed")
        with self._imm_lock:
            waiters = [wt[1] for q in self._imm_waiters.values() for wt in q]
            self._imm_waiters.clear()
        with self._inbox_lock:
            waiters += [t for q in self._inbox_waiters.values() for t in q]
            self._inbox_waiters.clear()
            self._inbox.clear()
            self._inbox_peer.clear()
        with self._timer_cv:
            self._take_new_timers()
            waiters += [t for _, _, ref in self._timers if (t := ref()) is not None]
            self._timers.clear()
        for t in waiters:
            t._fail(err)
        for r in regions:
            r._release()
        if self._probe is not None:
            self._probe.close()
        self._timer_thread.join(timeout=2)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _forget_peer(self, peer_id: bytes) -> None:
        """A peer gone past its grace: drop everything kept for it."""
        self.forget_partials(peer_id)
        with self._lock:
            for r in self._regions.values():
                r._shm_peers.discard(peer_id)
            stale = [k for k, a in self._addresses.items() if a.engine_id == peer_id]
            for k in stale:
                del self._addresses[k]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("engine is closed")

    def _peer(self, address: bytes) -> EngineAddress:
        addr = self._addresses.get(address)
        if addr is None:
            addr = EngineAddress.from_bytes(address)
            if len(self._addresses) >= 4096:
                self._addresses.clear()  # a cache: bounded, whatever the callers pass
            self._addresses[bytes(address)] = addr
        return addr

    def _transport_for(self, peer: EngineAddress, desc: RegionDescriptor) -> Transport:
        for name in self._order:  # shm and nixl in the caller's order; tcp reaches everyone
            if name == "shm" and self._shm is not None and self._shm.reaches(peer, desc):
                return self._shm
            if name == "nixl" and self._nixl is not None and self._nixl.reaches(peer, desc):
                return self._nixl
        if not desc.shm and self._shm is not None and not int(desc.access) & _REMOTE_READ:
            self._tell_write_only(peer, desc)
        return self._tcp

    def _tell_write_only(self, peer: EngineAddress, desc: RegionDescriptor) -> None:
        """A write-only region of a same-host peer goes over tcp (the shm transport maps a
        region whole, and a mapping that can write can read): say so once per region."""
        key = (peer.engine_id, desc.region_id)
        if key in self._told_write_only or len(self._told_write_only) >= 1024 or \
                not self._shm.same_host(peer):  # type: ignore[union-attr]
            return
        self._told_write_only.add(key)
        log.debug("region %d of %s is write-only: this same-host peer reaches it over tcp, "
                  "not shared memory (allocate it with Access.READ_WRITE to use shm)",
                  desc.region_id, peer)
