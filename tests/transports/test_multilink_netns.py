"""Multi-link tcp on real kernel links: veth pairs between two namespaces, capped by tc tbf.

Each test builds its own namespaces (removed afterwards, also on failure), runs the peer engine
in namespace b and the writing engine in namespace a, and compares the engine's throughput
with the configured link rates. Rates are low (100-300 Mbit/s per link) so that the two CPU
cores are never the bottleneck: what limits the transfer is the links, as on real NICs.
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


def test_tbf_link_delivers_its_configured_rate() -> None:
    """The emulation itself: a raw socket over one capped link gets about the cap."""
    with NetnsLinks([LinkSpec("200mbit")]) as net:
        rate = measure_raw_throughput(net, 0, int(net.links[0].bytes_per_s * 1.2))
        assert 0.85 <= rate / net.links[0].bytes_per_s <= 1.1, rate


@pytest.mark.parametrize("nlinks", [2, 4])
def test_links_aggregate(nlinks: int, child_env: dict[str, str]) -> None:
    per_link = f"{400 // nlinks}mbit"  # 400 Mbit/s in total either way
    with NetnsLinks([LinkSpec(per_link) for _ in range(nlinks)]) as net:
        (r,) = _transfer(net, child_env, seconds=2.5)
        share = r["bytes_per_s"] / net.total_bytes_per_s
        assert share >= 0.85, f"{nlinks} links reached {share:.2f} of the sum of their rates"


def test_uneven_links_aggregate(child_env: dict[str, str]) -> None:
    """1:3 rates: work stealing must let the fast link carry three times the slow one."""
    with NetnsLinks([LinkSpec("100mbit"), LinkSpec("300mbit")]) as net:
        (r,) = _transfer(net, child_env, seconds=2.5)
        share = r["bytes_per_s"] / net.total_bytes_per_s
        assert share >= 0.8, f"uneven links reached {share:.2f} of the sum of their rates"


def test_link_down_mid_transfer_completes_checksummed(child_env: dict[str, str]) -> None:
    """NIC 0 fails 0.5 s into a ~3 s transfer: the rest carries on, resends what was lost."""
    with NetnsLinks([LinkSpec("200mbit"), LinkSpec("200mbit")]) as net:
        timers: list[threading.Timer] = []

        def fail_link(_rep: int) -> None:
            t = threading.Timer(0.5, net.set_link, args=(0, False))
            t.start()
            timers.append(t)

        start = time.monotonic()
        (r,) = _transfer(net, child_env, seconds=3.0, on_started=fail_link)
        for t in timers:
            t.join()
        assert timers, "the transfer never started"
        # One link of two carried most of it: slower than both, yet finished well in time.
        assert r["bytes_per_s"] < 0.9 * net.total_bytes_per_s
        assert time.monotonic() - start < 45
