"""Weight updates between emulated hosts: the publisher and each replica in its own network
namespace with its own rate-capped NIC on a switch (``NetnsHosts``), real TCP between them.

What a single host cannot show: with a chain, the trainer's NIC carries the model once however
many replicas there are, and each relay forwards it once; with direct fan-out the trainer's NIC
carries it once per replica. Checked with the kernel's byte counters of each NIC, not timers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

import tensorfabric as tf
from tensorfabric.testing.netns import _RAW_CLIENT, _RAW_SERVER, NetnsHosts, skip_unless_netns
from tensorfabric.weights import Publisher, Subscriber, WeightPlan, same_layout, specs_of

from helpers.weights import expected_bytes, replica_bytes

pytestmark = [pytest.mark.netns, pytest.mark.slow]
SECRET = "weights-fabric"
N = 3  # replicas, on hosts 1..3


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # 3 MB: the NIC counters are dominated by the weights
    return {"emb": rng.standard_normal((2048, 256), dtype=np.float32),
            "proj": rng.standard_normal((1024, 256), dtype=np.float32),
            "norm": rng.standard_normal(256, dtype=np.float32)}


@pytest.fixture(scope="module")
def fab() -> Iterator[NetnsHosts]:
    skip_unless_netns()
    with NetnsHosts(N + 1, rate="400mbit") as net:
        yield net


def _engine(fab: NetnsHosts, host: int) -> tf.Engine:
    with fab.inside(host):
        return tf.Engine(secret=SECRET, host=fab.addr(host), transports=["tcp"], timeout=20,
                         name=f"h{host}")


@pytest.mark.parametrize("fan", ["chain", "direct"])
def test_chain_sends_the_model_once_from_the_trainer_direct_sends_it_per_replica(
        fab: NetnsHosts, fan: str) -> None:
    w1, w2 = _weights(1), _weights(2)
    src = specs_of(w1)
    plan = WeightPlan(src, same_layout(src), chunk_bytes=1 << 20)
    engines = [_engine(fab, h) for h in range(N + 1)]
    subs: list[Subscriber] = []
    try:
        for h in range(1, N + 1):
            with fab.inside(h):  # the subscriber's threads (and its forwards) live on host h
                subs.append(Subscriber(engines[h], engines[0].address, plan.layout, name=f"r{h}",
                                       timeout=20))
        with fab.inside(0), Publisher(engines[0], plan, fanout=fan, timeout=20) as pub:
            pub.wait_replicas(N, timeout=20)
            assert pub.publish(w1).ok  # warm-up: opens every connection
            before = [fab.nic_bytes(h) for h in range(N + 1)]
            res = pub.publish(w2)
            after = [fab.nic_bytes(h) for h in range(N + 1)]
        assert res.ok and sorted(res.updated) == [f"r{h}" for h in range(1, N + 1)], res
        for s in subs:
            assert replica_bytes(s) == (2, expected_bytes(plan, w2))
        sent = [(a[0] - b[0]) / plan.nbytes for a, b in zip(after, before)]
        got = [(a[1] - b[1]) / plan.nbytes for a, b in zip(after, before)]
        assert all(0.95 <= g <= 1.3 for g in got[1:]), f"each replica receives the model once: {got}"
        if fan == "chain":  # trainer -> ra -> rb -> rc, in the order the replicas joined
            assert 0.95 <= sent[0] <= 1.3, f"trainer NIC sent {sent[0]:.2f} models"
            relays = sorted(sent[1:])
            assert relays[0] < 0.1, f"the chain's tail forwards nothing: {sent}"
            assert all(0.95 <= s <= 1.3 for s in relays[1:]), f"relays forward once: {sent}"
        else:
            assert N * 0.95 <= sent[0] <= N * 1.3, f"trainer NIC sent {sent[0]:.2f} models"
            assert all(s < 0.1 for s in sent[1:]), f"replicas forward nothing: {sent}"
    finally:
        for s in subs:
            s.close()
        for e in engines:
            e.close()


def _streams(fab: NetnsHosts, pairs: list[tuple[int, int]], mb: int
             ) -> tuple[list[float], float, list[tuple[float, float]]]:
    """Concurrent raw TCP streams src -> dst (the netns module's raw-throughput scripts): each
    one's rate and all bytes over the wall time of the whole run, as shares of the NIC rate,
    and what each host's NIC sent and received meanwhile (kernel counters), in units of one
    stream's bytes."""
    nbytes = mb * 2**20
    before = [fab.nic_bytes(h) for h in range(fab.n)]
    sinks = []
    for i, (_, dst) in enumerate(pairs):
        p = fab.popen(dst, [sys.executable, "-c", _RAW_SERVER, fab.addr(dst), str(47000 + i), str(nbytes)],
                      stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        sinks.append(p)
    t0 = time.perf_counter()
    srcs = [fab.popen(src, [sys.executable, "-c", _RAW_CLIENT, fab.addr(dst), str(47000 + i), str(nbytes), ""])
            for i, (src, dst) in enumerate(pairs)]
    for p in srcs:
        assert p.wait(timeout=120) == 0
    wall = time.perf_counter() - t0
    rate = fab.specs[0].bytes_per_s
    each = []
    for p in sinks:
        assert p.stdout is not None
        got, secs = p.stdout.readline().split()
        assert int(got) == nbytes
        each.append(nbytes / float(secs) / rate)
    after = [fab.nic_bytes(h) for h in range(fab.n)]
    nics = [((a[0] - b[0]) / nbytes, (a[1] - b[1]) / nbytes) for a, b in zip(after, before)]
    return each, len(pairs) * nbytes / wall / rate, nics


def test_each_host_has_its_own_full_duplex_nic(fab: NetnsHosts) -> None:
    """The emulation itself, from the kernel's byte counters: a chain of streams goes out of
    and into each host's own NIC (a relay's NIC carries the stream in both directions), and
    two streams out of one host both leave through its one NIC. Rates are only checked from
    above (the cap holds; a busy machine makes streams slower, never faster); how close the
    streams get to the NIC rate is a benchmark: ``bench/netns_nics.py``."""
    mb = 8
    chain, _, nics = _streams(fab, [(0, 1), (1, 2), (2, 3)], mb)
    assert all(0 < r <= 1.15 for r in chain), chain
    (tx0, rx0), (tx1, rx1), (tx2, rx2), (tx3, rx3) = nics
    assert 1.0 <= tx0 <= 1.2 and rx0 < 0.1, nics  # ACKs are the small reverse traffic
    assert all(1.0 <= v <= 1.2 for v in (rx1, tx1, rx2, tx2)), nics
    assert rx3 >= 1.0 and tx3 < 0.1, nics
    shared, total, nics = _streams(fab, [(0, 1), (0, 2)], mb)  # both out of host 0's upload
    assert 0 < total <= 1.15, (shared, total)  # together they never beat the one NIC's cap
    assert 2.0 <= nics[0][0] <= 2.4 and all(nics[h][0] < 0.1 for h in (1, 2, 3)), nics
    assert nics[1][1] >= 1.0 and nics[2][1] >= 1.0 and nics[3][1] < 0.1, nics
