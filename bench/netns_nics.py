#!/usr/bin/env python
"""Emulated hosts on a switch (``NetnsHosts``): how close raw TCP streams get to the NIC rate.

Needs root (builds network namespaces; removes them afterwards). Four hosts, each with its own
tbf-capped NIC. Measured in one run: one stream alone (the baseline), a chain of three streams
0->1->2->3 at once (each host's NIC is its own and full duplex: ideally every hop at the NIC
rate, 3x the baseline in total), and two streams out of one host (they share its upload:
ideally 1x in total). Figures are shares of the configured NIC rate and ratios to the
baseline. This is the speed half of ``tests/integration/test_weights_fabric.py``'s NIC test
(the test checks the same runs with the kernel's byte counters)::

    sudo PYTHONPATH=src python bench/netns_nics.py --rate 400mbit --seconds 1.5 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from tensorfabric.testing.netns import _RAW_CLIENT, _RAW_SERVER, NetnsHosts, netns_unavailable_reason


def streams(fab: NetnsHosts, pairs: list[tuple[int, int]], nbytes: int) -> float:
    """All bytes over the wall time of concurrent raw streams, as a share of the NIC rate."""
    sinks = []
    for i, (_, dst) in enumerate(pairs):
        p = fab.popen(dst, [sys.executable, "-c", _RAW_SERVER, fab.addr(dst), str(47100 + i),
                            str(nbytes)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        sinks.append(p)
    t0 = time.perf_counter()
    srcs = [fab.popen(src, [sys.executable, "-c", _RAW_CLIENT, fab.addr(dst), str(47100 + i),
                            str(nbytes), ""]) for i, (src, dst) in enumerate(pairs)]
    for p in srcs:
        if p.wait(timeout=300) != 0:
            raise RuntimeError("a raw stream failed")
    wall = time.perf_counter() - t0
    for p in sinks:
        p.wait(timeout=60)
    return len(pairs) * nbytes / wall / fab.specs[0].bytes_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="400mbit", help="every NIC's rate (tc syntax)")
    p.add_argument("--seconds", type=float, default=1.5, help="length of one stream at the rate")
    p.add_argument("--reps", type=int, default=3, help="runs of each case (median shown)")
    args = p.parse_args()
    reason = netns_unavailable_reason()
    if reason:
        sys.exit(f"bench/netns_nics.py: {reason}")
    cases = {"one stream (baseline)": [(0, 1)], "chain 0->1->2->3": [(0, 1), (1, 2), (2, 3)],
             "two out of host 0": [(0, 1), (0, 2)]}
    ideal = {"one stream (baseline)": 1.0, "chain 0->1->2->3": 3.0, "two out of host 0": 1.0}
    with NetnsHosts(4, rate=args.rate) as fab:
        nbytes = int(fab.specs[0].bytes_per_s * args.seconds)
        got = {name: statistics.median(streams(fab, pairs, nbytes) for _ in range(args.reps))
               for name, pairs in cases.items()}
    base = got["one stream (baseline)"]
    print(f"{'case':<24} {'x NIC rate':>10} {'ideal':>6} {'/ baseline':>10}")
    for name, value in got.items():
        print(f"{name:<24} {value:>10.2f} {ideal[name]:>6.1f} {value / base:>10.2f}")


if __name__ == "__main__":
    main()
