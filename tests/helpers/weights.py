"""Shared pieces of the weight-update unit tests: small weights, expected replica bytes, engines."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

import tensorfabric as tf
from tensorfabric.weights import Subscriber, WeightPlan


def sample_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"emb": rng.standard_normal((300, 64), dtype=np.float32),
            "q": rng.standard_normal((64, 64), dtype=np.float32),
            "k": rng.standard_normal((32, 64), dtype=np.float32),
            "v": rng.standard_normal((32, 64), dtype=np.float32),
            "norm": rng.standard_normal(64, dtype=np.float32)}


def expected_bytes(plan: WeightPlan, w: dict[str, Any]) -> bytes:
    """What every replica must hold after publishing ``w`` (computed without any engine)."""
    out = np.zeros(plan.nbytes, np.uint8)
    src = plan.check_sources(w)
    for c in plan.chunks:
        plan.prepare(c.index, src, out)
    return out.tobytes()


def replica_bytes(sub: Subscriber) -> tuple[int, bytes]:
    with sub.acquire() as snap:
        return snap.version, sub.slots.buffers[snap.slot][: sub.layout.nbytes].tobytes()


@contextlib.contextmanager
def engine_fleet(transport: str, n: int, secret: str, prefix: str) -> Iterator[list[tf.Engine]]:
    """``n`` engines: tcp only, or shm (with tcp for control)."""
    transports = ("tcp",) if transport == "tcp" else ("shm", "tcp")
    engs = [tf.Engine(secret=secret, name=f"{prefix}{i}", timeout=10, transports=transports)
            for i in range(n)]
    try:
        yield engs
    finally:
        for e in engs:
            e.close()
