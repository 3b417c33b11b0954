"""Raw NIXL baseline: DRAM -> DRAM write and read between two processes, UCX over shm and tcp.

Two spawned processes, one NIXL agent each (UCX backend, NIXL's progress thread off), metadata
over a pipe, one prepared transfer handle reused per size, one op in flight; each write
carries a notification as a tensorfabric write with an immediate does. The code lives in
``tensorfabric.transports._nixl_bench`` so ``tensorfabric bench --transport nixl`` runs the
same baseline.

    PYTHONPATH=src python bench/nixl_raw.py                  # shm and tcp, 4 KiB .. 1 GiB
    PYTHONPATH=src python bench/nixl_raw.py --tls shm --max-size 256MiB --ops write
"""
from __future__ import annotations

import argparse
import sys
import time

from tensorfabric.transports._nixl_bench import default_sizes, fmt_size, run_raw


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t.rstrip("kmg")) * mult)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="raw NIXL DRAM->DRAM throughput")
    ap.add_argument("--tls", action="append", help="shm, tcp or a raw UCX_TLS value (repeatable)")
    ap.add_argument("--ops", default="write,read")
    ap.add_argument("--max-size", default="1GiB")
    ap.add_argument("--net-devices", default="lo")
    args = ap.parse_args(argv)
    sizes = default_sizes(parse_size(args.max_size))
    print(f"# raw NIXL, DRAM->DRAM, 2 processes, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
          f"python {sys.version.split()[0]}")
    print(f"{'tls':>6} {'op':>6} {'size':>9} {'iters':>6} {'GB/s':>8}")
    for tls in args.tls or ["shm", "tcp"]:
        for r in run_raw(sizes, tls=tls, ops=tuple(args.ops.split(",")),
                         net_devices=args.net_devices):
            print(f"{r['tls']:>6} {r['op']:>6} {fmt_size(r['size']):>9} {r['iters']:>6} "
                  f"{r['gbps']:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
