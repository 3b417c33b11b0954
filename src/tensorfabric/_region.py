"""Memory regions: the local owner of a registration and the descriptor peers receive."""

from __future__ import annotations

import enum
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import ClosedError, ConfigError

if TYPE_CHECKING:
    from ._engine import Engine


class Access(enum.IntFlag):
    """What peers may do to a region. Local code can always read and write its own memory."""

    NONE = 0
    REMOTE_WRITE = 1
    REMOTE_READ = 2
    READ_WRITE = 3


KEY_BYTES = 16
_DESC_MAGIC = b"tfRD"
_DESC_VERSION = 2
_DESC_HEAD = struct.Struct("<4sBBHQQ16s")  # magic, version, access, flags, region, nbytes, key
_FLAG_SHM = 1
_U64 = (1 << 64) - 1
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux 5.1


@dataclass(frozen=True)
class RegionDescriptor:
    """What a peer needs to reach a region: bytes-serializable, handed over out of band.

    Holding a descriptor grants the access it names: it carries the region's access key.
    Treat it like a capability and only give it to peers that should have that access.
    It names no file, process or address: a same-host peer that wants the region's shared
    memory asks the owner, which checks the key and hands over that region's memory itself.
    """

    owner: bytes  #: the owner engine's address (``Engine.address``)
    region_id: int
    nbytes: int
    access: Access
    key: bytes
    shm: bool = False  #: the owner can share this region's memory with same-host peers

    def to_bytes(self) -> bytes:
        head = _DESC_HEAD.pack(_DESC_MAGIC, _DESC_VERSION, int(self.access),
                               _FLAG_SHM if self.shm else 0, self.region_id, self.nbytes,
                               self.key)
        return head + self.owner

    __bytes__ = to_bytes

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> RegionDescriptor:
        """Parse a descriptor; anything truncated, unknown or out of range is a ConfigError."""
        try:
            data = bytes(data)
        except TypeError:
            raise ConfigError("a region descriptor must be bytes") from None
        if len(data) < _DESC_HEAD.size or data[:4] != _DESC_MAGIC:
            raise ConfigError("not a tensorfabric region descriptor (or a truncated one)")
        _, version, access, flags, region_id, nbytes, key = _DESC_HEAD.unpack_from(data)
        if version != _DESC_VERSION:
            raise ConfigError(f"region descriptor version {version} is not supported "
                              f"(this engine speaks version {_DESC_VERSION})")
        if access & ~int(Access.READ_WRITE) or flags & ~_FLAG_SHM:
            raise ConfigError("region descriptor has unknown access or flag bits")
        if len(data) == _DESC_HEAD.size:
            raise ConfigError("region descriptor has no owner address (truncated)")
        return cls(data[_DESC_HEAD.size:], region_id, nbytes, Access(access), key,
                   bool(flags & _FLAG_SHM))

    def __repr__(self) -> str:
        return (
            f"RegionDescriptor(region_id={self.region_id}, nbytes={self.nbytes}, "
            f"access={self.access!r}, shm={self.shm})"
        )


class ShmBacking:
    """An anonymous shared-memory file (memfd) mapped into this process.

    The owner hands the file itself to a same-host peer (over a unix socket, after checking the
    peer's key), opened with exactly the access the region grants; nothing is ever named in
    /dev/shm and nothing leaks when the owner dies: the kernel frees the memory when the last
    process unmaps it. The file is sealed against shrinking and growing (a peer cannot truncate
    it under the owner), and a read-only region also against any new writable mapping or
    write, so a peer cannot upgrade the read-only file it was given.
    """

    def __init__(self, nbytes: int, name: str = "tensorfabric", *,
                 read_only_peers: bool = False) -> None:
        self.nbytes = nbytes
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, max(nbytes, 1))
            self.map = mmap.mmap(self.fd, max(nbytes, 1), mmap.MAP_SHARED | mmap.MAP_POPULATE)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            if read_only_peers:
                seals |= _F_SEAL_FUTURE_WRITE  # our own mapping above stays writable
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
        except BaseException:
            os.close(self.fd)
            raise

    def open_for_peer(self, writable: bool) -> int:
        """A new descriptor of this file for a peer: read-write, or read-only."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        return os.open(f"/proc/self/fd/{self.fd}", flags)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # numpy views still alive; the mapping goes when they do
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MemoryRegion:
    """A registered range of local memory. Create with :meth:`Engine.register` or
    :meth:`Engine.alloc`; hand ``region.descriptor()`` to the peers that need it."""

    def __init__(
        self,
        engine: Engine,
        region_id: int,
        view: memoryview,
        access: Access,
        key: bytes,
        owner_obj: Any = None,
        shm: ShmBacking | None = None,
    ) -> None:
        self._engine = engine
        self.id = region_id
        self._view: memoryview | None = view
        self.access = access
        self._access_bits = int(access)  # what the receive path checks (a plain int)
        self._key = key
        self._owner_obj = owner_obj  # keeps the user's buffer alive while registered
        self._shm = shm
        #: same-host peers that were handed this region's memory (told when it is unregistered)
        self._shm_peers: set[bytes] = set()

    @property
    def nbytes(self) -> int:
        return self.view.nbytes

    @property
    def view(self) -> memoryview:
        """A flat uint8 memoryview of the region's memory."""
        if self._view is None:
            raise ClosedError("region was unregistered", region=self.id)
        return self._view

    @property
    def array(self) -> np.ndarray:
        """The region as a flat ``np.uint8`` array (shares memory)."""
        return np.frombuffer(self.view, dtype=np.uint8)

    def view_as(self, dtype: Any, shape: tuple[int, ...] | int | None = None) -> np.ndarray:
        """The region's memory as a typed numpy array (shares memory)."""
        arr = self.array.view(np.dtype(dtype))
        return arr if shape is None else arr.reshape(shape)

    @property
    def closed(self) -> bool:
        return self._view is None

    def descriptor(self) -> RegionDescriptor:
        """The bytes-serializable capability a peer uses to reach this region."""
        return RegionDescriptor(
            owner=self._engine.address,
            region_id=self.id,
            nbytes=self.nbytes,
            access=self.access,
            key=self._key,
            shm=self.shares_memory,
        )

    @property
    def shares_memory(self) -> bool:
        """Whether same-host peers may map this region: it is shared-memory backed and a
        mapping can grant exactly its access (read-write or read-only; a write-only region
        cannot be mapped without also being readable, so peers reach it over tcp)."""
        return (self._shm is not None and bool(self.access & Access.REMOTE_READ)
                and self._engine._shm is not None)

    def close(self) -> None:
        """Unregister: peers' later accesses fail with AccessError."""
        self._engine.unregister(self)

    def _release(self) -> None:
        if self._view is None:
            return
        self._view = None
        self._owner_obj = None
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes"
        kind = "shm" if self._shm else "host"
        return f"<MemoryRegion {self.id} {kind} {state} access={self.access!r}>"
