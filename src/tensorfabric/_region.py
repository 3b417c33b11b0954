"""Memory regions: the local owner of a registration and the descriptor peers receive."""

from __future__ import annotations

import enum
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
_DESC_HEAD = struct.Struct("<4sBBHQQQ16s")  # magic, version, access, flags, region, nbytes, pid, key
_FLAG_SHM = 1
_SHM_FD = struct.Struct("<i")


@dataclass(frozen=True)
class RegionDescriptor:
    """What a peer needs to reach a region: bytes-serializable, handed over out of band.

    Holding a descriptor grants the access it names: it carries the region's access key.
    Treat it like a capability and only give it to peers that should have that access.
    """

    owner: bytes  #: the owner engine's address (``Engine.address``)
    region_id: int
    nbytes: int
    access: Access
    key: bytes
    shm_pid: int = 0  #: owner pid when the region is shared-memory backed (same-host fast path)
    shm_fd: int = -1

    @property
    def shm(self) -> bool:
        return self.shm_fd >= 0

    def to_bytes(self) -> bytes:
        flags = _FLAG_SHM if self.shm else 0
        head = _DESC_HEAD.pack(
            _DESC_MAGIC, 1, int(self.access), flags, self.region_id, self.nbytes, self.shm_pid,
            self.key,
        )
        extra = _SHM_FD.pack(self.shm_fd) if self.shm else b""
        return head + extra + self.owner

    __bytes__ = to_bytes

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> RegionDescriptor:
        data = bytes(data)
        if len(data) < _DESC_HEAD.size or data[:4] != _DESC_MAGIC:
            raise ConfigError("not a tensorfabric region descriptor")
        magic, version, access, flags, region_id, nbytes, pid, key = _DESC_HEAD.unpack_from(data)
        if version != 1:
            raise ConfigError(f"region descriptor version {version} is not supported")
        pos = _DESC_HEAD.size
        fd = -1
        if flags & _FLAG_SHM:
            (fd,) = _SHM_FD.unpack_from(data, pos)
            pos += _SHM_FD.size
        return cls(data[pos:], region_id, nbytes, Access(access), key, pid, fd)

    def __repr__(self) -> str:
        return (
            f"RegionDescriptor(region_id={self.region_id}, nbytes={self.nbytes}, "
            f"access={self.access!r}, shm={self.shm})"
        )


class ShmBacking:
    """An anonymous shared-memory file (memfd) mapped into this process.

    Peers on the same host open it through ``/proc/<pid>/fd/<fd>`` after the owner checked their
    key, so nothing is ever named in /dev/shm and nothing leaks when the owner dies: the kernel
    frees the memory when the last process unmaps it.
    """

    def __init__(self, nbytes: int, name: str = "tensorfabric") -> None:
        self.nbytes = nbytes
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, max(nbytes, 1))
            self.map = mmap.mmap(self.fd, max(nbytes, 1), mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(self.fd)
            raise

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
        self._key = key
        self._owner_obj = owner_obj  # keeps the user's buffer alive while registered
        self._shm = shm

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
        shm = self._shm
        return RegionDescriptor(
            owner=self._engine.address,
            region_id=self.id,
            nbytes=self.nbytes,
            access=self.access,
            key=self._key,
            shm_pid=os.getpid() if shm else 0,
            shm_fd=shm.fd if shm else -1,
        )

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
