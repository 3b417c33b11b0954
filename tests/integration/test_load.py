"""Load: thousands of concurrent small ops and large ones, both ways, all verified."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import tensorfabric as tf

SECRET = "load-secret"
SLOT = 4096
SMALL = 3000
BIG = 8 << 20
NBIG = 4
SIZE = SMALL * SLOT + NBIG * BIG


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_thousands_of_small_and_large_ops_both_ways() -> None:
    with tf.Engine(SECRET, transports=("tcp",), links=2, name="a") as a, \
            tf.Engine(SECRET, transports=("tcp",), links=2, name="b") as b:
        regions = {e: e.register(np.zeros(SIZE, np.uint8)) for e in (a, b)}
        rng = np.random.default_rng(0)
        src = {e: rng.integers(0, 256, SIZE, dtype=np.uint8) for e in (a, b)}
        sizes = rng.integers(1, SLOT + 1, SMALL)
        for e in (a, b):
            regions[e].array[:] = 1  # fault pages in before measuring memory
        a.write(b"w", regions[b].descriptor()).wait(10)
        b.write(b"w", regions[a].descriptor()).wait(10)
        rss0 = _rss()

        def storm(me: tf.Engine, peer: tf.Engine) -> list[tf.Transfer]:
            desc = regions[peer].descriptor()
            out = []
            for i in range(SMALL):
                off = i * SLOT
                out.append(me.write(src[me][off:off + sizes[i]], desc, dst_offset=off, imm=1))
                if i % 750 == 0:  # large ones interleaved with the small
                    k = i // 750
                    base = SMALL * SLOT + k * BIG
                    out.append(me.write(src[me][base:base + BIG], desc, dst_offset=base, imm=2))
                if i % 10 == 0:
                    out.append(me.send(peer.address, src[me][off:off + 100].tobytes(), tag=3))
            return out

        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(storm, a, b), pool.submit(storm, b, a),
                    pool.submit(storm, a, b), pool.submit(storm, b, a)]
            transfers = [t for f in futs for t in f.result(timeout=120)]
        done = threading.Event()
        tf.gather(transfers).add_done_callback(lambda _: done.set())
        assert done.wait(120), "deadlock: transfers did not finish"
        tf.gather(transfers).wait(1)
        for e in (a, b):
            e.expect(1, 2 * SMALL).wait(30)
            e.expect(2, 2 * NBIG).wait(30)
            for _ in range(2 * SMALL // 10):
                assert len(e.recv(tag=3, timeout=30).data) == 100
        for me, peer in ((a, b), (b, a)):
            got = regions[peer].array
            for i in range(SMALL):
                off = i * SLOT
                assert np.array_equal(got[off:off + sizes[i]], src[me][off:off + sizes[i]]), i
            big = SMALL * SLOT
            assert np.array_equal(got[big:], src[me][big:])
        grown = _rss() - rss0
        assert grown < 256 << 20, f"engine memory grew by {grown >> 20} MiB"
