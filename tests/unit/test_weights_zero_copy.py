"""Zero-copy publishing over real engines (shm and tcp): chunks written straight from the trainer's
tensors verify, a corrupt one is rejected, and late joiners catch up only to bytes that still
match the published version."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric.weights import Faults, Publisher, Subscriber, WeightPlan, fuse, same_layout, specs_of

from helpers.weights import engine_fleet, expected_bytes, replica_bytes, sample_weights

SECRET = "weights-zero-copy"


def _plan(w: dict[str, np.ndarray]) -> WeightPlan:
    src = specs_of(w)  # fp32 -> fp32: emb goes straight from memory, the fused qkv is staged
    dest = fuse(same_layout(src, order=["norm", "v", "k", "q", "emb"]), "qkv", ["q", "k", "v"])
    return WeightPlan(src, dest, chunk_bytes=8192, direct_min_bytes=4096)


@pytest.fixture(params=["shm", "tcp"])
def engines(request: pytest.FixtureRequest) -> Iterator[list[tf.Engine]]:
    with engine_fleet(request.param, 4, SECRET, "z") as engs:
        yield engs


def test_zero_copy_chunks_verify_and_a_corrupt_one_is_rejected(engines: list[tf.Engine]) -> None:
    w1, w2 = sample_weights(1), sample_weights(2)
    plan = _plan(w1)
    direct = [c.index for c in plan.chunks if c.source is not None]
    assert direct and len(direct) < len(plan.chunks)  # both paths are exercised
    faults = Faults()
    with Publisher(engines[0], plan, fanout="chain", timeout=10, faults=faults) as pub:
        subs = [Subscriber(e, engines[0].address, plan.layout, name=f"s{i}", timeout=10)
                for i, e in enumerate(engines[1:3])]
        pub.wait_replicas(2, timeout=10)
        res = pub.publish(w1)
        assert res.ok and sorted(res.updated) == ["s0", "s1"], res
        for s in subs:
            assert replica_bytes(s) == (1, expected_bytes(plan, w1))
        c = plan.chunks[direct[0]]  # it went from w1's memory: staging never held these bytes
        assert not pub.staging.array[c.offset : c.offset + c.nbytes].any()

        # bytes of a chunk change in the trainer's memory after their checksum was taken
        before = {k: v.copy() for k, v in w2.items()}
        faults.corrupt = {direct[-1]}
        res = pub.publish(w2)
        assert not res.updated and set(res.failed) == {"s0", "s1"}, res
        assert all(why.startswith("corrupt") for why in res.failed.values()), res
        for s in subs:
            assert replica_bytes(s) == (1, expected_bytes(plan, w1))  # still serving the old version
        assert all(np.array_equal(w2[k], before[k]) for k in w2)  # the injected flip was undone
        faults.corrupt = set()
        assert pub.publish(w2).ok
        for s in subs:
            assert replica_bytes(s) == (3, expected_bytes(plan, w2))
        for s in subs:
            s.close()


def test_late_joiner_catches_up_only_to_unchanged_trainer_bytes(engines: list[tf.Engine]) -> None:
    w1, w2 = sample_weights(1), sample_weights(2)
    plan = _plan(w1)
    with Publisher(engines[0], plan, timeout=10) as pub:
        first = Subscriber(engines[1], engines[0].address, plan.layout, name="first", timeout=10)
        pub.wait_replicas(1, timeout=10)
        assert pub.publish(w1).ok
        # staging lacks the zero-copy chunks; the catch-up re-stages them from w1 (unchanged)
        late = Subscriber(engines[2], engines[0].address, plan.layout, name="late", timeout=10)
        assert late.wait_version(1, timeout=10) == 1
        assert replica_bytes(late) == (1, expected_bytes(plan, w1))

        assert pub.publish(w2).ok
        w2["emb"] *= 2  # the trainer moves on in place: version 2 is gone from its memory
        later = Subscriber(engines[3], engines[0].address, plan.layout, name="later", timeout=10)
        later.wait_joined(timeout=10)
        time.sleep(1.0)  # the catch-up loop runs and must refuse to send changed bytes as v2
        assert later.version == 0 and not later.rejected
        res = pub.publish(w2)  # the next publish brings it up to date
        assert res.ok and sorted(res.updated) == ["first", "late", "later"], res
        assert replica_bytes(later) == (3, expected_bytes(plan, w2))
        for s in (first, late, later):
            s.close()
