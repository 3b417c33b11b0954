"""Multi-link tcp on real kernel links: veth pairs between two namespaces, capped by tc tbf.

Each test builds its own namespaces (removed afterwards, also on failure), runs the peer engine
in namespace b and the writing engine in namespace a, and checks what the kernel's byte
counters of each link say: which links carried the data, and in what proportion. Nothing here
compares a speed with a threshold that a busy machine could miss (caps are only checked from
above: load makes a link slower, never faster); the throughput a link set reaches, as a share
of the sum of the link rates, is a benchmark: ``bench/multilink.py``
(docs/benchmarks.md).
"""

from __future__ import annotations

import threading
import time

import pytest

from tensorfabric.testing.netns import LinkSpec, NetnsLinks, measure_raw_throughput, skip_unless_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MB = 1_000_000


@pytest.fixture(autouse=True)
def _need_netns() -> None:
    skip_unless_netns()


def _transfer(net: NetnsLinks, env: dict[str, str], seconds: float, reps: int = 1,
              **kw: object) -> list[dict]:
    from tensorfabric.bench._multilink import run_over_netns

    nbytes = int(net.total_bytes_per_s * seconds) // 4096 * 4096
    results = run_over_netns(net, nbytes, reps=reps, env=env, timeout=60, **kw)
    for r in results:
        assert r["crc_ok"], f"data landed corrupted: {r}"
        assert r["imm_counted"] and not r["imm_extra"], f"immediate miscounted: {r}"
    return results


def _tx_bytes(net: NetnsLinks) -> list[int]:
    """Bytes each link has sent from side a so far (the kernel's counters)."""
    paths = [f"/sys/class/net/{link.dev}/statistics/tx_bytes" for link in net.links]
    return [int(v) for v in net.run("a", ["cat", *paths]).stdout.split()]


def _carried(net: NetnsLinks, env: dict[str, str], seconds: float) -> list[float]:
    """One striped transfer; each link's share of the bytes the links sent meanwhile."""
    before = _tx_bytes(net)
    _transfer(net, env, seconds=seconds)
    sent = [a - b for a, b in zip(_tx_bytes(net), before)]
    return [s / sum(sent) for s in sent]


def test_tbf_link_caps_its_rate() -> None:
    """The emulation itself: a raw socket over one capped link never beats the cap (a busy
    machine makes it slower, which is not what this checks)."""
    with NetnsLinks([LinkSpec("200mbit")]) as net:
        rate = measure_raw_throughput(net, 0, int(net.links[0].bytes_per_s * 1.2))
        assert 0 < rate / net.links[0].bytes_per_s <= 1.15, rate


@pytest.mark.parametrize("nlinks", [2, 4])
def test_links_aggregate(nlinks: int, child_env: dict[str, str]) -> None:
    """One write is striped over every link: each carries a fair part of the bytes (ideal
    1/n with equal rates; at least a third of that), and the data and immediate arrive once."""
    per_link = f"{400 // nlinks}mbit"  # 400 Mbit/s in total either way
    with NetnsLinks([LinkSpec(per_link) for _ in range(nlinks)]) as net:
        shares = _carried(net, child_env, seconds=1.5)
        assert min(shares) >= 1 / (3 * nlinks), f"per-link shares of the bytes: {shares}"


def test_uneven_links_aggregate(child_env: dict[str, str]) -> None:
    """1:3 rates: work stealing lets the fast link carry more than the slow one (ideal three
    times; checked at more than 1.5 times), and the slow one still carries its part."""
    with NetnsLinks([LinkSpec("100mbit"), LinkSpec("300mbit")]) as net:
        slow, fast = _carried(net, child_env, seconds=1.5)
        assert fast > 1.5 * slow and slow > 0.05, f"slow {slow:.2f}, fast {fast:.2f}"


def test_link_down_mid_transfer_completes_checksummed(child_env: dict[str, str]) -> None:
    """NIC 0 fails 0.5 s into a ~3 s transfer: the rest carries on, resends what was lost."""
    with NetnsLinks([LinkSpec("200mbit"), LinkSpec("200mbit")]) as net:
        timers: list[threading.Timer] = []

        def fail_link(_rep: int) -> None:
            t = threading.Timer(0.5, net.set_link, args=(0, False))
            t.start()
            timers.append(t)

        start = time.monotonic()
        # a downed veth sends no reset: the engines notice after link_timeout without progress
        (r,) = _transfer(net, child_env, seconds=3.0, on_started=fail_link, link_timeout=1.5)
        for t in timers:
            t.join()
        assert timers, "the transfer never started"
        # One link of two carried most of it: slower than both (an upper bound: load only
        # slows it further), and it finished within the timeouts rather than hanging.
        assert r["bytes_per_s"] < 0.9 * net.total_bytes_per_s
        assert time.monotonic() - start < 90


def _netns_names() -> set[str]:
    import subprocess

    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_namespaces_removed_on_error_and_stale_ones_swept() -> None:
    import subprocess

    from tensorfabric.testing.netns import cleanup_stale

    with pytest.raises(RuntimeError, match="boom"):
        with NetnsLinks(2) as net:
            names = set(net.ns.values())
            assert names <= _netns_names()
            raise RuntimeError("boom")
    assert not names & _netns_names()
    # a run killed with SIGKILL leaves its namespaces; the next one removes them
    stale = "tfnet-999999999-deadbeef-a"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale()
        assert stale not in _netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
