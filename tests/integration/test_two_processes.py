"""Two OS processes moving data both ways, verified by checksum."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers.procs import PeerProcess

import tensorfabric as tf

SECRET = "peer-secret"
N = 24 << 20


def _data(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("shm", [False, True], ids=["tcp", "shm"])
def test_both_ways_with_checksums(shm: bool) -> None:
    transports = ("shm", "tcp") if shm else ("tcp",)
    with tf.Engine(SECRET, transports=transports, links=2) as eng, \
            PeerProcess(N, shm=shm, links=2) as child:
        mine = eng.alloc(N) if shm else eng.register(np.zeros(N, np.uint8))
        # parent -> child, with an immediate the child waits for
        payload = _data(1, N)
        child.send(cmd="expect", imm=5)
        eng.write(payload, child.desc, imm=5).wait(60)
        assert child._line() == {"ok": True}
        assert child.call(cmd="sha", n=N)["sha"] == hashlib.sha256(payload).hexdigest()
        # child -> parent
        reply = child.call(cmd="write", desc=mine.descriptor().to_bytes().hex(), seed=2, n=N,
                           imm=6)
        eng.expect(6).wait(60)
        assert reply["sha"] == hashlib.sha256(mine.array).hexdigest()
        assert np.array_equal(mine.array, _data(2, N))
        # one-sided reads both ways
        back = np.zeros(N, np.uint8)
        eng.read(child.desc, back).wait(60)
        assert np.array_equal(back, payload)
        assert child.call(cmd="read", desc=mine.descriptor().to_bytes().hex(), n=N)["sha"] == \
            hashlib.sha256(mine.array).hexdigest()
