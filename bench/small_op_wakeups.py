"""Thread wake-ups and CPU per small op, in both processes (issue 16).

    PYTHONPATH=src python bench/small_op_wakeups.py [--transport tcp|tcp-plain] [--imm 3000]
        [--msgs 2000] [--writes 4k,64k] [--threads]

Runs ``--imm`` immediate round trips (``barrier`` to the peer, which counts them),
``--msgs`` 64 B send/recv round trips (the peer echoes) and, with ``--writes``, ``--msgs``
synchronous writes of each size (each waited for) against ``tensorfabric bench``'s peer
process, then the same writes over a raw socket to its own child process (the baseline), and
prints each point's p50 with the context switches (voluntary and involuntary, all threads) and
the CPU time per op of this process (user + system, and each) and of the peer, read from
``getrusage`` and ``/proc``. Run it once per tree, alternating trees, to compare two versions.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time
from typing import Any, Callable

import numpy as np

from tensorfabric.bench import RawSocketPeer, parse_size
from tensorfabric.bench._engine import engine_from_options
from tensorfabric.bench._peer import DATA_TAG
from tensorfabric.bench._runner import IMM_PING, BenchConfig, PeerProcess, Session


def _mine() -> tuple[int, float, float]:
    """This process: context switches, CPU seconds, of them user seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_nvcsw + r.ru_nivcsw, r.ru_utime + r.ru_stime, r.ru_utime


def _theirs(pid: int) -> tuple[int, float]:
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    with open(f"/proc/{pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return switches, (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


def _threads() -> dict[str, tuple[int, float]]:
    """This process's threads by name: voluntary context switches, CPU seconds."""
    out = {}
    for th in threading.enumerate():
        try:
            with open(f"/proc/self/task/{th.native_id}/status") as f:
                vcs = next(int(line.split()[1]) for line in f
                           if line.startswith("voluntary_ctxt_switches"))
            with open(f"/proc/self/task/{th.native_id}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
        except (OSError, StopIteration):
            continue
        out[th.name] = (vcs, (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def _measure(name: str, fn: Callable[[], Any], n: int, pid: int, threads: bool) -> None:
    for _ in range(50):
        fn()
    before = _threads() if threads else {}
    c0, u0, s0 = _mine()
    p0, q0 = _theirs(pid)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    c1, u1, s1 = _mine()
    p1, q1 = _theirs(pid)
    for th, (v1, cpu1) in sorted(_threads().items()) if threads else ():
        v0, cpu0 = before.get(th, (v1, cpu1))
        if v1 - v0 > 0.02 * n or cpu1 - cpu0 > 0.01:
            print(f"  {th}: voluntary switches/op {(v1 - v0) / n:.2f}, "
                  f"CPU/op {(cpu1 - cpu0) / n * 1e6:.0f} us")
    print(f"{name}: p50 {statistics.median(lat) * 1e6:.0f} us; context switches/op "
          f"me {(c1 - c0) / n:.2f} peer {(p1 - p0) / n:.2f}; CPU/op me {(u1 - u0) / n * 1e6:.0f} "
          f"(user {(s1 - s0) / n * 1e6:.0f}) peer {(q1 - q0) / n * 1e6:.0f} us "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--imm", type=int, default=3000)
    ap.add_argument("--msgs", type=int, default=2000)
    ap.add_argument("--writes", default="",
                    help="comma list of write sizes to measure too (engine, then raw socket)")
    ap.add_argument("--threads", action="store_true",
                    help="also each thread of this process (switches and CPU per op)")
    a = ap.parse_args()
    cfg = BenchConfig(transports=(a.transport,))
    peer = PeerProcess(a.transport, cfg)
    eng = engine_from_options(host=cfg.host, transport=a.transport, links=1, link_addrs=[],
                              name="bench", timeout=60)
    try:
        s = Session(eng, peer.address, cfg, a.transport)
        pid = peer.proc.pid
        _measure("imm", lambda: eng.barrier([peer.address], IMM_PING + 2).wait(30), a.imm, pid,
                 a.threads)
        data = bytes(64)
        s.ctrl("echo", wait=False, n=a.msgs + 50)

        def echo() -> None:
            eng.send(peer.address, data, tag=DATA_TAG).wait(30)
            eng.recv(tag=DATA_TAG, timeout=30)

        _measure("sendrecv 64 B", echo, a.msgs, pid, a.threads)
        s.reply()
        sizes = [parse_size(x) for x in a.writes.split(",") if x]
        if sizes:
            _writes(eng, s, sizes, a.msgs, pid, a.threads)
        s.ctrl("quit")
    finally:
        peer.close()
        eng.close()


def _writes(eng: Any, s: Session, sizes: list[int], n: int, pid: int, threads: bool) -> None:
    """Synchronous writes of each size: the engine's to the peer process's region, then a raw
    socket's to its own child process (its CPU is that child's)."""
    cap = max(sizes)
    _rid, desc = s.remote_region(cap)
    src = eng.register(np.ones(cap, dtype=np.uint8))
    for size in sizes:
        _measure(f"write {size} B", lambda: eng.write(src, desc, nbytes=size).wait(30), n, pid,
                 threads)
    raw = RawSocketPeer(bufsize=cap, chunk=eng._tcp.chunk_bytes)
    try:
        assert raw._proc is not None
        for size in sizes:
            _measure(f"raw socket write {size} B", lambda: raw.write(size), n, raw._proc.pid,
                     threads)
    finally:
        raw.close()


if __name__ == "__main__":
    main()
