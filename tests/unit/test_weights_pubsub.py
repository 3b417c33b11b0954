"""Publisher and subscribers over real engines (in one process, shm and tcp): fan-out, checksums,
rejection of corrupt or incomplete updates, dead replicas, late joiners."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric.weights import (
    DstTensor,
    Faults,
    Part,
    Publisher,
    PublishResult,
    Subscriber,
    WeightPlan,
    fuse,
    same_layout,
    specs_of,
)

from helpers.weights import engine_fleet, expected_bytes, replica_bytes, sample_weights

SECRET = "weights-unit"


@pytest.fixture(params=["shm", "tcp"])
def engines(request: pytest.FixtureRequest) -> Iterator[list[tf.Engine]]:
    with engine_fleet(request.param, 5, SECRET, "e") as engs:
        yield engs


def _plan(w: dict[str, np.ndarray]) -> WeightPlan:
    src = specs_of(w)
    dest = fuse(same_layout(src, dtype="bfloat16", order=["norm", "v", "k", "q", "emb"]), "qkv", ["q", "k", "v"])
    return WeightPlan(src, dest, chunk_bytes=8192)


def test_tree_fanout_converted_update_reaches_every_replica(engines: list[tf.Engine]) -> None:
    w1, w2 = sample_weights(1), sample_weights(2)
    plan = _plan(w1)
    assert len(plan.chunks) > 4
    with Publisher(engines[0], plan, fanout="tree", degree=2, timeout=10) as pub:
        subs = [Subscriber(e, engines[0].address, plan.layout, name=f"s{i}", timeout=10)
                for i, e in enumerate(engines[1:4])]
        pub.wait_replicas(3, timeout=10)
        for v, w in ((1, w1), (2, w2)):
            res = pub.publish(w)
            assert res.ok and sorted(res.updated) == ["s0", "s1", "s2"], res
            for s in subs:
                assert replica_bytes(s) == (v, expected_bytes(plan, w))
        # a late joiner is caught up to the current version without a publish
        late = Subscriber(engines[4], engines[0].address, plan.layout, name="late", timeout=10)
        assert late.wait_version(2, timeout=10) == 2
        assert replica_bytes(late)[1] == expected_bytes(plan, w2)
        for s in subs + [late]:
            s.close()


def test_corrupt_and_incomplete_updates_are_rejected(engines: list[tf.Engine]) -> None:
    w1, w2 = sample_weights(1), sample_weights(2)
    plan = _plan(w1)
    with Publisher(engines[0], plan, fanout="chain", timeout=10, checksum="crc32") as pub:
        subs = [Subscriber(e, engines[0].address, plan.layout, name=f"s{i}", timeout=10)
                for i, e in enumerate(engines[1:3])]
        pub.wait_replicas(2)
        assert pub.publish(w1).ok
        pub.faults = Faults(corrupt={2})
        res = pub.publish(w2)
        assert set(res.failed) == {"s0", "s1"} and all(r.startswith("corrupt") for r in res.failed.values())
        pub.faults = Faults(drop={len(plan.chunks) - 1})
        t0 = time.monotonic()
        res = pub.publish(w2, timeout=1.5)
        assert time.monotonic() - t0 < 15  # two rounds of 1.5 s + grace; slack for a loaded CI
        assert set(res.failed) == {"s0", "s1"} and all("incomplete" in r for r in res.failed.values()), res
        for s in subs:  # still serving version 1, byte for byte
            assert replica_bytes(s) == (1, expected_bytes(plan, w1))
            kinds = [r.split(":")[0] for _, r in s.rejected]  # incomplete ones are retried once, directly
            assert kinds[0] == "corrupt" and set(kinds[1:]) == {"incomplete"}, kinds
        pub.faults = Faults()
        assert pub.publish(w2).ok
        for s in subs:
            assert replica_bytes(s)[1] == expected_bytes(plan, w2)
            s.close()


def test_dead_replica_is_dropped_and_others_still_update(engines: list[tf.Engine]) -> None:
    w1 = sample_weights(1)
    plan = _plan(w1)
    with Publisher(engines[0], plan, fanout="chain", timeout=5) as pub:
        subs = [Subscriber(e, engines[0].address, plan.layout, name=f"s{i}", timeout=5)
                for i, e in enumerate(engines[1:4])]
        pub.wait_replicas(3)
        subs[0].close()
        engines[1].close()  # the head of the chain is gone
        t0 = time.monotonic()
        res = pub.publish(w1)
        assert time.monotonic() - t0 < 12
        assert sorted(res.updated) == ["s1", "s2"] and res.failed["s0"].startswith("dead"), res
        assert sorted(pub.replicas) == ["s1", "s2"]
        for s in subs[1:]:
            assert replica_bytes(s) == (1, expected_bytes(plan, w1))
            s.close()


class _HeldSends:
    """The publisher's engine, except that its sends to ``held`` wait until ``release`` is set
    (a round to a replica's old engine that is slow to fail)."""

    def __init__(self, engine: tf.Engine) -> None:
        self.engine, self.held = engine, b""
        self.reached, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def send(self, address: bytes, *args: object, **kw: object) -> object:
        if bytes(address) == self.held:
            self.reached.set()
            assert self.release.wait(30)
        return self.engine.send(address, *args, **kw)


def test_replica_that_rejoins_from_a_new_engine_during_a_round_is_kept(
        engines: list[tf.Engine]) -> None:
    """Replica r restarts (a new engine) while a round still targets its old one: the round's
    failure drops the old registration only; the new one is caught up to the version."""
    w1, w2 = sample_weights(1), sample_weights(2)
    plan = _plan(w1)
    held = _HeldSends(engines[0])
    with Publisher(held, plan, timeout=5) as pub:  # type: ignore[arg-type]
        old = Subscriber(engines[1], engines[0].address, plan.layout, name="r", timeout=5)
        pub.wait_member("r", engines[1].address, timeout=10)
        assert pub.publish(w1).ok
        old.close()
        engines[1].close()
        held.held = engines[1].address
        out: list[PublishResult] = []
        round_ = threading.Thread(target=lambda: out.append(pub.publish(w2)))
        round_.start()
        assert held.reached.wait(10), "the round never tried the old engine"
        new = Subscriber(engines[2], engines[0].address, plan.layout, name="r", timeout=5)
        pub.wait_member("r", engines[2].address, timeout=10)  # hello while the round runs
        held.release.set()
        round_.join(30)
        assert out and out[0].failed["r"].startswith("dead"), out
        assert pub.replicas == ["r"], "the failure to reach the old engine dropped the new one"
        assert new.wait_version(2, timeout=20) == 2  # caught up from the publisher
        assert replica_bytes(new) == (2, expected_bytes(plan, w2))
        new.close()


def test_mismatched_layout_is_refused() -> None:
    w = sample_weights(1)
    plan = _plan(w)
    other = WeightPlan(specs_of(w), [DstTensor("q", "float32", (Part("q"),))])
    with tf.Engine(secret=SECRET) as a, tf.Engine(secret=SECRET) as b, Publisher(a, plan) as pub:
        sub = Subscriber(b, a.address, other.layout, name="odd", timeout=5)
        sub.wait_joined()
        assert sub.rejected and "fingerprint" in sub.rejected[0][1]
        assert pub.replicas == []
        sub.close()


def test_replica_without_the_checksum_refuses_the_round_and_keeps_serving(
        tmp_path: Path, child_env: dict[str, str]) -> None:
    """A replica process without xxhash (hidden from its imports) cannot compute the publisher's
    xxh3: it refuses the round before taking a slot, says why, and keeps serving what it has;
    the publisher can fall back to lanesum for it."""
    pytest.importorskip("xxhash")
    w1, w2 = sample_weights(1), sample_weights(2)
    plan = _plan(w1)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(plan.layout.to_json()))
    hide = ("import sys; sys.modules['xxhash'] = None; "  # import xxhash -> ImportError
            "from tensorfabric.weights.replica import main; main()")
    with tf.Engine(secret=SECRET, transports=["tcp"]) as a, \
            Publisher(a, plan, checksum="lanesum", timeout=10) as pub:
        proc = subprocess.Popen(
            [sys.executable, "-c", hide, "--name", "old", "--publisher", a.address.hex(),
             "--layout", str(layout), "--timeout", "10", "--engine", '{"transports": ["tcp"]}'],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**child_env, "TENSORFABRIC_SECRET": SECRET})
        assert proc.stdin is not None and proc.stdout is not None

        def call(**cmd: object) -> dict:
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        try:
            assert json.loads(proc.stdout.readline())["ready"]
            pub.wait_replicas(1)
            assert pub.publish(w1).ok
            pub.checksum = "xxh3"
            res = pub.publish(w2)
            assert not res.ok and "needs the xxhash package" in res.failed["old"], res
            state = call(cmd="version")
            assert state["version"] == 1 and "tensorfabric[weights]" in state["rejected"][-1][1]
            assert len(state["rejected"]) == 1, "refused once, not retried"
            assert call(cmd="digest")["crc"] == zlib.crc32(expected_bytes(plan, w1))
            pub.checksum = "lanesum"
            assert pub.publish(w2).ok
            assert call(cmd="digest") == {"version": 3, "crc": zlib.crc32(expected_bytes(plan, w2))}
        finally:
            proc.stdin.close()
            proc.wait(timeout=20)
