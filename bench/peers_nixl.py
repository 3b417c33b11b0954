#!/usr/bin/env python
"""tensorfabric (shm and tcp transports) against raw NVIDIA NIXL (UCX), same sizes, same run.

Rounds alternate: raw NIXL over UCX shm (cma) and over UCX tcp (two fresh processes each,
``tensorfabric.transports._nixl_bench.run_raw``, written with the nixl transport), then
tensorfabric's own shm and tcp writes between two engines in two processes
(``tensorfabric.bench.run_bench``). Each figure keeps the median over rounds; the ratio
columns are tensorfabric / NIXL on the same kind of path (shm vs UCX shm, tcp vs UCX tcp)::

    PYTHONPATH=src python bench/peers_nixl.py --sizes 1m,16m,64m,256m --rounds 2

Needs the nixl transport (branch ``nixl``) and ``pip install nixl`` (see docs/nixl.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict

from tensorfabric.bench import BenchConfig, parse_size, run_bench
from tensorfabric.bench._stats import human_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1m,16m,64m,256m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.5, help="seconds per tensorfabric point")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    try:
        from tensorfabric.transports._nixl_bench import run_raw
    except ImportError as exc:
        sys.exit(f"raw NIXL baseline unavailable ({exc}): needs the nixl transport and "
                 "`pip install nixl`")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    got: dict[tuple[str, int], list[float]] = defaultdict(list)
    for rnd in range(args.rounds):
        for tls in ("shm", "tcp"):
            for row in run_raw(sizes, tls=tls, ops=("write",)):
                got[(f"nixl-{tls}", row["size"])].append(row["gbps"])
            print(f"# round {rnd}: raw NIXL over UCX {tls} done", file=sys.stderr, flush=True)
        report = run_bench(BenchConfig(transports=("shm", "tcp"), ops=("write",),
                                       sizes=tuple(sizes), budget_s=args.budget))
        for r in report.rows:
            got[(f"tf-{r.transport}", r.size)].append(r.gbps or 0.0)
        print(f"# round {rnd}: tensorfabric done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"{'size':>8} {'NIXL shm':>9} {'tf shm':>8} {'tf/NIXL':>8} {'NIXL tcp':>9} "
          f"{'tf tcp':>8} {'tf/NIXL':>8}   (GB/s, median of {args.rounds} rounds)")
    rows = []
    for size in sizes:
        ns, ts = med[("nixl-shm", size)], med[("tf-shm", size)]
        nt, tt = med[("nixl-tcp", size)], med[("tf-tcp", size)]
        rows.append({"size": size, "nixl_shm": ns, "tf_shm": ts, "nixl_tcp": nt, "tf_tcp": tt})
        print(f"{human_size(size):>8} {ns:>9.2f} {ts:>8.2f} {ts / ns:>8.2f} {nt:>9.2f} "
              f"{tt:>8.2f} {tt / nt:>8.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
