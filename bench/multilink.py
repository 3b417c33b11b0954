#!/usr/bin/env python
"""Multi-link throughput on emulated NICs: 1, 2 and 4 tbf-limited veth links at two rates.

Needs root (builds two network namespaces; removes them afterwards). For each rate and link
count it measures a raw Python TCP stream over one link (the baseline: what one NIC gives),
then one striped engine write over all links, and prints both as a share of the configured
rates::

    sudo PYTHONPATH=src python bench/multilink.py                 # 100 and 400 Mbit/s links
    sudo PYTHONPATH=src python bench/multilink.py --rates 200mbit --links 1,2,4 --seconds 3
    sudo PYTHONPATH=src python bench/multilink.py --rates 400mbit --links 2,4 --uneven 100mbit,300mbit

(for the uneven row "of sum" is the figure; its raw baseline runs on the fastest link)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tensorfabric.bench._multilink import run_over_netns
from tensorfabric.testing.netns import LinkSpec, NetnsLinks, measure_raw_throughput, netns_unavailable_reason


def measure(rate: str, nlinks: int, seconds: float, reps: int,
            rates: list[str] | None = None) -> dict[str, object]:
    """One row; ``rates`` (one per link) replaces ``rate`` x ``nlinks`` for uneven links (the
    raw baseline then runs on the fastest link)."""
    specs = [LinkSpec(r) for r in rates] if rates else [LinkSpec(rate) for _ in range(nlinks)]
    with NetnsLinks(specs) as net:
        fastest = max(range(len(net.links)), key=lambda i: net.links[i].bytes_per_s)
        per_link = net.links[fastest].bytes_per_s
        nlinks = len(net.links)
        raw = measure_raw_throughput(net, fastest, int(per_link * seconds))
        nbytes = int(net.total_bytes_per_s * seconds) // 4096 * 4096
        results = run_over_netns(net, nbytes, reps=reps, timeout=120)
        best = sorted(r["bytes_per_s"] for r in results)[len(results) // 2]
        assert all(r["crc_ok"] and r["imm_counted"] and not r["imm_extra"] for r in results)
        return {"rate": rate, "links": nlinks, "sum_MBps": net.total_bytes_per_s / 1e6,
                "raw_one_link_MBps": raw / 1e6, "raw_share": raw / per_link,
                "engine_MBps": best / 1e6, "engine_share": best / net.total_bytes_per_s,
                "engine_vs_raw_x_links": best / (raw * nlinks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="100mbit,400mbit", help="per-link rates (tc syntax)")
    p.add_argument("--links", default="1,2,4")
    p.add_argument("--seconds", type=float, default=2.5, help="length of each transfer")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--uneven", default=None,
                   help="also one row with these per-link rates, e.g. 100mbit,300mbit")
    args = p.parse_args()
    reason = netns_unavailable_reason()
    if reason:
        sys.exit(f"bench/multilink.py: {reason}")
    rows = []
    print(f"{'rate/link':>10} {'links':>5} {'sum MB/s':>9} {'raw 1 link':>10} {'engine MB/s':>11} "
          f"{'of sum':>7} {'vs raw x N':>10}")
    configs: list[tuple[str, int, list[str] | None]] = [
        (rate, n, None) for rate in args.rates.split(",") for n in map(int, args.links.split(","))]
    if args.uneven:
        configs.append(("+".join(args.uneven.split(",")), 0, args.uneven.split(",")))
    for rate, n, rates in configs:
        r = measure(rate, n, args.seconds, args.reps, rates)
        rows.append(r)
        print(f"{rate:>10} {r['links']:>5} {r['sum_MBps']:>9.1f} {r['raw_one_link_MBps']:>10.1f} "
              f"{r['engine_MBps']:>11.1f} {r['engine_share']:>7.2f} "
              f"{r['engine_vs_raw_x_links']:>10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
