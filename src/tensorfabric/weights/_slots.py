"""Double-buffered, versioned receive slots.

A replica owns two slots, each a flat buffer in the replica layout. Readers take a lease on the
active slot (``acquire()``) and keep it for a whole forward pass or generation; an update is
written into the other slot, which is handed out only when no reader holds it, and becomes active
with one pointer swap after it has been verified. So a reader sees one version, never a mix.

With a single buffer (a consumer that copies each verified version elsewhere, as vLLM does),
readers and the writer exclude each other: ``reserve`` waits until no reader holds the buffer,
and from then until the next ``commit`` no version can be leased (the buffer is being
overwritten; an aborted update leaves none).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorfabric import TransferTimeout
from tensorfabric.weights._errors import NoVersionError
from tensorfabric.weights._layout import Layout


@dataclass(frozen=True)
class Snapshot:
    """One version's tensors, valid while the lease that returned it is held."""

    version: int
    slot: int
    tensors: dict[str, np.ndarray]
    extra: Any = None  # e.g. a torch model bound to this slot


class SlotSet:
    """Two slots over ``buffers`` (flat uint8 arrays of at least ``layout.nbytes``), or one
    slot over a single buffer (see the module's docstring)."""

    def __init__(self, layout: Layout, buffers: Sequence[np.ndarray]) -> None:
        if len(buffers) not in (1, 2):
            raise ValueError("a SlotSet needs one or two buffers")
        self.single = len(buffers) == 1
        self.layout = layout
        self.buffers = list(buffers) * (2 if self.single else 1)
        self.views = [layout.views(b) for b in self.buffers]
        self.extras: list[Any] = [None, None]
        self._cond = threading.Condition()
        self._active = -1  # no version yet
        self._versions = [0, 0]
        self._readers = [0, 0]
        self._writing = -1

    @property
    def version(self) -> int:
        """The version readers get now (0: none yet)."""
        with self._cond:
            return self._versions[self._active] if self._active >= 0 else 0

    @contextmanager
    def acquire(self) -> Iterator[Snapshot]:
        """Lease the active version for the duration of the ``with`` block."""
        with self._cond:
            slot = self._active
            if slot < 0:
                raise NoVersionError("no weights have arrived yet: wait_version(1) first")
            self._readers[slot] += 1
            snap = Snapshot(self._versions[slot], slot, self.views[slot], self.extras[slot])
        try:
            yield snap
        finally:
            with self._cond:
                self._readers[slot] -= 1
                self._cond.notify_all()

    def reserve(self, timeout: float) -> int:
        """The inactive slot, once no reader holds it; it is then reserved for writing.

        Raises TransferTimeout when readers keep it longer than ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            slot = 0 if self.single or self._active < 0 else 1 - self._active
            while self._readers[slot] or (self.single and self._readers[1]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeout(
                        f"slot {slot} still has {sum(self._readers)} reader(s) of version "
                        f"{self._versions[slot]} after {timeout:.1f} s; release leases sooner"
                    )
                self._cond.wait(left)
            self._writing = slot
            if self.single:  # the buffer's version is being overwritten
                self._active = -1
            return slot

    def commit(self, slot: int, version: int) -> None:
        """Make ``slot`` (fully written and verified) the active version, atomically."""
        with self._cond:
            if slot != self._writing:
                raise RuntimeError(f"slot {slot} was not reserved for writing")
            self._versions[slot] = version
            self._active = slot
            self._writing = -1
            self._cond.notify_all()

    def abort(self, slot: int) -> None:
        """Give up a reserved slot; the active version is untouched."""
        with self._cond:
            if self._writing == slot:
                self._writing = -1

    def wait_version(self, version: int, timeout: float) -> int:
        """Block until the active version is >= ``version``; returns it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.version_locked() < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeout(
                        f"version {version} did not arrive within {timeout:.1f} s "
                        f"(serving {self.version_locked()})"
                    )
                self._cond.wait(left)
            return self.version_locked()

    def version_locked(self) -> int:
        return self._versions[self._active] if self._active >= 0 else 0
