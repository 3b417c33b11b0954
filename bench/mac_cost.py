"""What the frame MACs cost a large tcp write, as wall time and as CPU time, same run.

    python bench/mac_cost.py [--mib 64] [--writes 8] [--rounds 5] [--chunk-mib 4]

Two engines in two processes on loopback (one link); each round measures the plain link
(``integrity=False``) and then the default (frame MACs on), each on a fresh engine pair, and
prints GB/s, the CPU seconds each process spent per GB moved (user + system, all its
threads, from /proc) and its threads' context switches per GB (a hand-off between threads
costs two or more). The summary gives the median of the rounds' wall ratios (MAC / plain)
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


def _switches(pid: int) -> int:
    """Context switches of every thread of ``pid`` (voluntary + involuntary)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:  # the thread ended
            pass
    return total


def _owner(integrity: bool, nbytes: int, conn: Any) -> None:
    import tensorfabric as tf

    with tf.Engine("mac-cost", integrity=integrity, transports=("tcp",), name="owner") as e:
        region = e.register(np.ones(nbytes, np.uint8))
        conn.send((region.descriptor().to_bytes(), os.getpid()))
        conn.recv()


def one(integrity: bool, nbytes: int, writes: int,
        chunk: int = 0) -> tuple[float, float, float, float, float]:
    """(GB/s, writer CPU s/GB, owner CPU s/GB, writer and owner context switches per GB) for
    ``writes`` writes of ``nbytes``."""
    import tensorfabric as tf

    here, there = mp.Pipe()
    p = mp.Process(target=_owner, args=(integrity, nbytes, there))
    p.start()
    try:
        desc, pid = here.recv()
        me = os.getpid()
        kw = {"chunk_bytes": chunk} if chunk else {}
        with tf.Engine("mac-cost", integrity=integrity, transports=("tcp",), name="w", **kw) as e:
            src = np.ones(nbytes, np.uint8)
            e.write(src, desc).wait(120)  # connect, warm up
            s0, z0 = _switches(pid), _switches(me)
            c0, w0, t0 = _cpu(pid), _cpu(me), time.perf_counter()
            for _ in range(writes):
                e.write(src, desc).wait(120)
            wall = time.perf_counter() - t0
            c1, w1 = _cpu(pid), _cpu(me)
            s1, z1 = _switches(pid), _switches(me)
        gb = nbytes * writes / 1e9
        return gb / wall, (w1 - w0) / gb, (c1 - c0) / gb, (z1 - z0) / gb, (s1 - s0) / gb
    finally:
        here.send(None)
        p.join(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--writes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk-mib", type=int, default=0, help="the writer's chunk (frame) size")
    args = ap.parse_args()
    mp.set_start_method("spawn")
    n = args.mib << 20
    walls, cpus = [], {False: [], True: []}
    print(f"{args.mib} MiB writes, {args.writes} per variant per round; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"{'round':>5} {'variant':<8} {'GB/s':>6} {'cpu s/GB writer':>16} {'owner':>6} "
          f"{'switches/GB writer':>19} {'owner':>6}")
    for r in range(args.rounds):
        got = {}
        for integrity in (False, True):
            gbs, wc, oc, ws, os_ = one(integrity, n, args.writes, args.chunk_mib << 20)
            got[integrity] = gbs
            cpus[integrity].append(wc + oc)
            print(f"{r:>5} {'mac' if integrity else 'plain':<8} {gbs:6.2f} {wc:16.3f} {oc:6.3f} "
                  f"{ws:19.0f} {os_:6.0f}", flush=True)
        walls.append(got[True] / got[False])
    plain, mac = statistics.median(cpus[False]), statistics.median(cpus[True])
    print(f"wall ratio MAC/plain: median {statistics.median(walls):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in walls)})")
    print(f"CPU per GB, both processes: plain {plain:.3f} s, MAC {mac:.3f} s -> "
          f"CPU ratio {plain / mac:.2f}; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
