"""Double-buffered slots: a reader never sees a mix of versions, writers wait for readers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric.weights import Layout, NoVersionError, SlotSet, TensorSpec


def _slots() -> SlotSet:
    layout = Layout([TensorSpec("a", (1000,), "int64"), TensorSpec("b", (3, 7), "int64")])
    return SlotSet(layout, [np.zeros(layout.nbytes, np.uint8) for _ in range(2)])


def _write(slots: SlotSet, version: int) -> None:
    slot = slots.reserve(timeout=5)
    for arr in slots.views[slot].values():
        arr[...] = 0  # a half-written slot would show zeros next to the version number
        arr[...] = version
    slots.commit(slot, version)


def test_readers_see_exactly_one_version_while_versions_swap() -> None:
    slots = _slots()
    with pytest.raises(NoVersionError):
        with slots.acquire():
            pass
    _write(slots, 1)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            with slots.acquire() as snap:
                values = {int(v) for arr in snap.tensors.values() for v in np.unique(arr)}
                if values != {snap.version}:
                    errors.append(f"version {snap.version} saw {sorted(values)[:4]}")
                seen.append(snap.version)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for v in range(2, 40):
        _write(slots, v)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert slots.version == 39 and len(set(seen)) > 2


def test_writer_waits_for_readers_of_the_free_slot_and_times_out() -> None:
    slots = _slots()
    _write(slots, 1)
    _write(slots, 2)  # slot 0 holds version 1, slot 1 version 2 (active)
    with slots.acquire() as snap:
        assert snap.version == 2
        slot = slots.reserve(timeout=1)  # the other slot is free: no wait
        slots.abort(slot)
    held = threading.Event()
    release = threading.Event()

    def old_reader() -> None:
        with slots.acquire():
            held.set()
            release.wait(5)

    t = threading.Thread(target=old_reader)
    t.start()
    held.wait(5)
    _write(slots, 3)  # goes to slot 0; the reader holds slot 1 (version 2)
    with pytest.raises(tf.TransferTimeout, match="reader"):
        slots.reserve(timeout=0.2)  # slot 1 is still leased
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    _write(slots, 4)
    assert time.monotonic() - t0 >= 0.15
    t.join()
    assert slots.wait_version(4, timeout=1) == 4
    with pytest.raises(tf.TransferTimeout):
        slots.wait_version(5, timeout=0.1)
