"""The nixl transport against raw NIXL, same run, same sizes, same UCX settings.

Raw NIXL and the wrapper (two tensorfabric Engines with transports=("nixl", "tcp")) live in
the same two processes and run alternately, batch by batch, ``--rounds`` times per size (the
order flips each round), so a noisy neighbour hurts both alike. Prints median GB/s and the
median of the per-round wrapper/raw ratios (with their range); the target is >= 0.90 from
64 MiB up.

    PYTHONPATH=src python bench/nixl_compare.py                       # shm and tcp, 4 KiB..256 MiB
    PYTHONPATH=src python bench/nixl_compare.py --tls shm --max-size 1GiB --rounds 3
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

from nixl_raw import parse_size

from tensorfabric.transports._nixl_bench import compare, default_sizes, fmt_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nixl transport vs raw NIXL")
    ap.add_argument("--tls", action="append", help="shm, tcp or a raw UCX_TLS value (repeatable)")
    ap.add_argument("--ops", default="write,read")
    ap.add_argument("--min-size", default="4KiB")
    ap.add_argument("--max-size", default="256MiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--net-devices", default="lo")
    ap.add_argument("--no-confirm", action="store_true",
                    help="nixl option confirm=False: ops complete when NIXL is done, no owner ack")
    args = ap.parse_args(argv)
    sizes = default_sizes(parse_size(args.max_size), parse_size(args.min_size))
    print(f"# nixl transport vs raw NIXL, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
          f"{platform.node()}, python {sys.version.split()[0]}")
    print(f"# command: python bench/nixl_compare.py {' '.join(argv or sys.argv[1:])}")
    rows = compare(sizes, tls=tuple(args.tls or ["shm", "tcp"]), ops=tuple(args.ops.split(",")),
                   net_devices=args.net_devices, rounds=args.rounds,
                   nixl={"confirm": False} if args.no_confirm else None,
                   progress=lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    print("| UCX | op | size | raw NIXL GB/s | nixl transport GB/s | wrapper / raw (range) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tls']} | {r['op']} | {fmt_size(r['size'])} | {r['raw_gbps']:.2f} | "
              f"{r['wrapper_gbps']:.2f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-"
              f"{r['ratio_max']:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
