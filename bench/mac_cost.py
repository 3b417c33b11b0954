"""What the frame MACs cost a large tcp write, as wall time and as CPU time, same run.

    python bench/mac_cost.py [--mib 64] [--writes 8] [--rounds 5]

Two engines in two processes on loopback (one link); each round measures the plain link
(``integrity=False``) and then the default (frame MACs on), each on a fresh engine pair, and
prints GB/s and the CPU seconds each process spent per GB moved (user + system, all its
threads, from /proc). The summary gives the median of the rounds' wall ratios (MAC / plain)
and the CPU ratio (plain's CPU per GB over the MAC's, both processes together): on a machine
whose cores are all busy (other work, or the link itself) the link's throughput follows its
CPU cost, so the CPU ratio is what the wall ratio tends to there, whatever the load. Linux only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import numpy as np


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _owner(integrity: bool, nbytes: int, conn: Any) -> None:
    import tensorfabric as tf

    with tf.Engine("mac-cost", integrity=integrity, transports=("tcp",), name="owner") as e:
        region = e.register(np.ones(nbytes, np.uint8))
        conn.send((region.descriptor().to_bytes(), os.getpid()))
        conn.recv()


def one(integrity: bool, nbytes: int, writes: int) -> tuple[float, float, float]:
    """(GB/s, writer CPU s/GB, owner CPU s/GB) for ``writes`` writes of ``nbytes``."""
    import tensorfabric as tf

    here, there = mp.Pipe()
    p = mp.Process(target=_owner, args=(integrity, nbytes, there))
    p.start()
    try:
        desc, pid = here.recv()
        with tf.Engine("mac-cost", integrity=integrity, transports=("tcp",), name="w") as e:
            src = np.ones(nbytes, np.uint8)
            e.write(src, desc).wait(120)  # connect, warm up
            c0, w0, t0 = _cpu(pid), _cpu(os.getpid()), time.perf_counter()
            for _ in range(writes):
                e.write(src, desc).wait(120)
            wall = time.perf_counter() - t0
            c1, w1 = _cpu(pid), _cpu(os.getpid())
        gb = nbytes * writes / 1e9
        return gb / wall, (w1 - w0) / gb, (c1 - c0) / gb
    finally:
        here.send(None)
        p.join(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--writes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    mp.set_start_method("spawn")
    n = args.mib << 20
    walls, cpus = [], {False: [], True: []}
    print(f"{args.mib} MiB writes, {args.writes} per variant per round; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"{'round':>5} {'variant':<8} {'GB/s':>6} {'cpu s/GB writer':>16} {'owner':>6}")
    for r in range(args.rounds):
        got = {}
        for integrity in (False, True):
            gbs, wc, oc = one(integrity, n, args.writes)
            got[integrity] = gbs
            cpus[integrity].append(wc + oc)
            print(f"{r:>5} {'mac' if integrity else 'plain':<8} {gbs:6.2f} {wc:16.3f} {oc:6.3f}",
                  flush=True)
        walls.append(got[True] / got[False])
    plain, mac = statistics.median(cpus[False]), statistics.median(cpus[True])
    print(f"wall ratio MAC/plain: median {statistics.median(walls):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in walls)})")
    print(f"CPU per GB, both processes: plain {plain:.3f} s, MAC {mac:.3f} s -> "
          f"CPU ratio {plain / mac:.2f}; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
