"""CPU per small op: what one write costs the sender's and the receiver's processes.

    python bench/op_cpu.py                      # 4 KiB writes over tcp, 64 in flight
    python bench/op_cpu.py --size 64k --transport tcp-plain --ops 50000

A stream of ``--ops`` one-sided writes of ``--size`` bytes into a peer process's region (64 in
flight, as ``tensorfabric bench``'s write points), then the same bytes through a raw loopback
socket (``sendall`` of each message to a peer that ``recv``s them), in the same run. Reports
each side's CPU time per op (user + system, from ``/proc``, every thread) and the engine's
ratio to the raw socket's. Throughput on a shared 2-core machine swings with the load; CPU per
op swings far less, so per-op trims show here first (docs/benchmarks.md, "Small ops, fourth
pass"). ``bench/small_op_cpu.py`` is the other small-op program: it measures speed (ratios to
raw), not CPU time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time

import numpy as np

DEPTH = 64


def _cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _size(text: str) -> int:
    from tensorfabric.bench._stats import parse_size  # the CLI's own size syntax

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _engine_peer(size: int, transports: tuple[str, ...], integrity: bool, q: mp.Queue,
                 done: mp.Queue) -> None:
    import tensorfabric as tf

    with tf.Engine(secret="op-cpu", name="peer", transports=transports, integrity=integrity) as e:
        r = e.register(np.zeros(size * DEPTH, np.uint8), access=tf.Access.READ_WRITE)
        q.put((e.address, r.descriptor().to_bytes()))
        done.get()


def _raw_peer(port: int, total: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(1 << 20)
    got = 0
    while got < total:
        n = s.recv_into(buf)
        if not n:
            break
        got += n
    s.sendall(b"k")
    s.close()


def engine_point(size: int, ops: int, transport: str) -> tuple[float, float, float]:
    """(sender CPU us/op, receiver CPU us/op, wall us/op) of ``ops`` engine writes."""
    import tensorfabric as tf

    transports = ("tcp",) if transport.startswith("tcp") else ("shm", "tcp")
    integrity = transport != "tcp-plain"
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_engine_peer, args=(size, transports, integrity, q, done))
    p.start()
    try:
        with tf.Engine(secret="op-cpu", name="bench", transports=transports,
                       integrity=integrity) as e:
            _, raw_desc = q.get(timeout=60)
            desc = tf.RegionDescriptor.from_bytes(raw_desc)
            src = np.ones(size, np.uint8)

            def run(n: int) -> None:
                inflight = []
                for i in range(n):
                    inflight.append(e.write(src, desc, dst_offset=(i % DEPTH) * size))
                    if len(inflight) >= DEPTH:
                        inflight.pop(0).wait(60)
                for t in inflight:
                    t.wait(60)

            run(min(ops, 1000))  # links up, caches warm
            c0, r0, t0 = _cpu(os.getpid()), _cpu(p.pid), time.perf_counter()
            run(ops)
            c1, r1, t1 = _cpu(os.getpid()), _cpu(p.pid), time.perf_counter()
    finally:
        done.put(1)
        p.join(30)
    return (c1 - c0) / ops * 1e6, (r1 - r0) / ops * 1e6, (t1 - t0) / ops * 1e6


def raw_point(size: int, ops: int) -> tuple[float, float, float]:
    """The same bytes, one ``sendall`` per message, through a raw loopback socket."""
    ls = socket.create_server(("127.0.0.1", 0))
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_raw_peer, args=(ls.getsockname()[1], size * ops))
    p.start()
    c, _ = ls.accept()
    ls.close()
    data = bytes(size)
    c0, r0, t0 = _cpu(os.getpid()), _cpu(p.pid), time.perf_counter()
    for _ in range(ops):
        c.sendall(data)
    c.recv(1)  # the peer has every byte
    c1, r1, t1 = _cpu(os.getpid()), _cpu(p.pid), time.perf_counter()
    c.close()
    p.join(30)
    return (c1 - c0) / ops * 1e6, (r1 - r0) / ops * 1e6, (t1 - t0) / ops * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=_size, default="4k", help="bytes per write (4096, 4k, 1m, ...)")
    ap.add_argument("--ops", type=int, default=20000, help="writes per point")
    ap.add_argument("--transport", default="tcp", choices=["tcp", "tcp-plain", "shm"])
    args = ap.parse_args(argv)
    size = args.size
    if args.ops <= 0:
        ap.error("--ops must be positive")
    es, er, ew = engine_point(size, args.ops, args.transport)
    rs, rr, rw = raw_point(size, args.ops)
    print(f"{args.transport} writes of {size} B, {args.ops} ops, load {os.getloadavg()[0]:.1f}")
    print(f"  engine: sender {es:6.1f} us/op, receiver {er:6.1f} us/op, wall {ew:6.1f} us/op")
    print(f"  raw   : sender {rs:6.1f} us/op, receiver {rr:6.1f} us/op, wall {rw:6.1f} us/op")
    ratio = lambda a, b: f"{a / b:.1f}x" if b > 0 else "n/a (raise --ops: CPU time is in clock ticks)"  # noqa: E731
    print(f"  engine/raw CPU: sender {ratio(es, rs)}, receiver {ratio(er, rr)}, "
          f"both {ratio(es + er, rs + rr)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
