"""The contract between the engine and a transport."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import numpy as np

from .._address import EngineAddress
from .._ops import WireOp
from .._region import RegionDescriptor


class InboundHandler(Protocol):
    """What a transport calls when a peer's operation arrives. The engine implements it.

    Every method is called from a transport thread and must not block on the network.
    """

    def resolve(self, region: int, key: bytes, need: int, table: np.ndarray | tuple[int, int],
                end: int = 0) -> tuple[int, str, memoryview | None]:
        """Check a remote access before any byte lands: returns ``(Status, reason, region view)``.

        ``table`` is the frame's segment table (``_wire.SEG_DTYPE``), or its one segment as an
        ``(offset, length)`` tuple of Python ints (the small-op path); every segment, and the
        whole op (up to ``end``), must lie inside the region and ``need`` (an ``Access`` flag)
        must be granted, and ``key`` must be the region's key, else a non-OK status and nothing
        is touched.
        """

    def write_targets(self) -> dict[int, Any]:
        """The regions peers may reach, by id, as the engine keeps them (each with ``_view``,
        ``_key`` and ``_access_bits``): what a compiled receive path checks a write against,
        exactly as :meth:`resolve` does."""

    def landed(self, peer_id: bytes, op_id: int, chunk: int, nchunks: int,
               imm: int | None) -> tuple[int, str]:
        """A chunk's bytes are in place. Counts ``imm`` once per logical op, however many
        chunks (and links) carried it, and never twice for a resent chunk. Returns a status:
        a peer that leaves too many immediates unclaimed or unfinished is refused."""

    def reserve_inbox(self, nbytes: int, peer: bytes = b"") -> bool:
        """Count ``nbytes`` of a message about to arrive from ``peer`` (its address bytes)
        against the inbox bound and that peer's share of it (False: full)."""

    def release_inbox(self, nbytes: int, peer: bytes = b"") -> None:
        """Give back a reservation whose message was not queued."""

    def deliver(self, peer: EngineAddress, tag: int, data: bytes,
                reserved: int = 0) -> tuple[int, str]:
        """A two-sided message arrived (``reserved``: its bytes are already counted by
        :meth:`reserve_inbox` for this peer; the reservation is used or given back). Returns a
        status."""

    def shm_open(self, peer_id: bytes, region: int, key: bytes,
                 need: int) -> tuple[int, str, bytes]:
        """A same-host peer asks for a region's memory: checks key and permission like
        :meth:`resolve` and returns ``(Status, reason, grant)`` (the SHM_OPEN_RESP body)."""


class Transport(ABC):
    """A way to move bytes between this engine and a peer engine.

    The engine validates every argument (types, local bounds, the descriptor's permissions)
    before calling a transport, builds the :class:`WireOp` whose ``transfer`` reports the
    outcome, and picks the transport per peer and region. A transport's methods never wait for
    the peer: they queue the work and return (a first connection to a peer may be dialled in
    the caller's thread, bounded by the connect timeout). Completion and failure are reported
    only through ``wop`` (``wop.chunk_replied`` / ``wop.transfer._fail``); errors the peer
    reports are mapped to :class:`AccessError` or :class:`TransportError`, lost peers to
    :class:`BrokenError`. Calls may overlap from any number of threads.

    Buffer ownership: the caller keeps ``src`` (and a read's ``dst``) alive and unchanged until
    the transfer completes. Transports never copy payloads into buffers of their own on the
    receive path: bytes land in the destination region directly.
    """

    name: ClassVar[str]
    #: can write into / read from a peer's memory without the peer's CPU taking part per byte
    one_sided: ClassVar[bool] = True
    #: can move device (GPU) memory
    device_memory: ClassVar[bool] = False
    #: only works between engines on the same host
    same_host_only: ClassVar[bool] = False

    def reaches(self, peer: EngineAddress, desc: RegionDescriptor | None) -> bool:
        """Whether this transport can carry ops to ``desc`` (or, with None, to ``peer``)."""
        return True

    @abstractmethod
    def write(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src: memoryview,
              src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray,
              imm: int | None) -> None:
        """Copy ``src[src_off[i]:+lengths[i]]`` to the region at ``dst_off[i]`` for every i,
        then, once all bytes are in place at the peer, count ``imm`` there once."""

    def write_one(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp,
                  src: memoryview, src_offset: int, dst_offset: int, nbytes: int,
                  imm: int | None) -> None:
        """:meth:`write` of one segment, given as Python ints (the engine checked them against
        both buffers). A transport with a cheaper path for one segment overrides this."""
        self.write(peer, desc, wop, src, np.array([src_offset], np.uint64),
                   np.array([dst_offset], np.uint64), np.array([nbytes], np.uint64), imm)

    @abstractmethod
    def read(self, peer: EngineAddress, desc: RegionDescriptor, wop: WireOp, src_offset: int,
             dst: memoryview) -> None:
        """Copy ``dst.nbytes`` bytes of the region from ``src_offset`` into ``dst``."""

    @abstractmethod
    def close(self) -> None:
        """Stop every thread, close every socket and mapping. Pending work fails with ClosedError."""
