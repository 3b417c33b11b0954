"""Does a send's acknowledgement sit on a request/response's critical path?

    python bench/sendrecv_waits.py --rounds 3 --n 1500

A 64-byte send/recv ping-pong between two processes (tcp, frame MACs off), two ways in
alternation: ``wait`` waits each ``send`` before its ``recv`` (today's use), ``after`` waits it
only once the reply has come (what eager sends would give: the acknowledgement's wait off the
critical path, every frame still sent and read). Prints each way's p50 round trip per round.
Measured in docs/benchmarks.md ("Small ops, fourth pass"): the same, so the frames' own cost,
not the waits, is what a faster send/recv has to cut.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time

SECRET = "sendrecv-waits"


def _peer(q: mp.Queue, addrq: mp.Queue, mode: str, n: int) -> None:
    import tensorfabric as tf

    with tf.Engine(secret=SECRET, name="peer", transports=("tcp",), integrity=False) as e:
        q.put(e.address)
        back = addrq.get(timeout=60)
        last = None
        for _ in range(n):
            m = e.recv(tag=1, timeout=30)
            t = e.send(back, m.data, tag=1)
            if mode == "wait":
                t.wait(30)
            else:
                if last is not None:
                    last.wait(30)
                last = t
        if last is not None:
            last.wait(30)
        time.sleep(0.5)  # let the last acknowledgement go out


def round_trip_p50(mode: str, n: int, size: int = 64) -> float:
    """p50 round trip (us) of ``n`` ping-pongs, ``send`` waited per ``mode``."""
    import tensorfabric as tf

    ctx = mp.get_context("spawn")
    q, addrq = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_peer, args=(q, addrq, mode, n + 1))
    p.start()
    try:
        with tf.Engine(secret=SECRET, name="bench", transports=("tcp",), integrity=False) as e:
            peer = q.get(timeout=60)
            addrq.put(e.address)
            data, lat = bytes(size), []
            for i in range(n + 1):
                t0 = time.perf_counter()
                t = e.send(peer, data, tag=1)
                if mode == "wait":
                    t.wait(30)
                    e.recv(tag=1, timeout=30)
                else:
                    e.recv(tag=1, timeout=30)
                    t.wait(30)
                if i:  # the first one opens the links
                    lat.append(time.perf_counter() - t0)
    finally:
        p.join(60)
    return statistics.median(lat) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1500, help="round trips per way and round")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.n < 1:
        ap.error("--rounds and --n must be positive")
    for r in range(args.rounds):
        got = {mode: round_trip_p50(mode, args.n) for mode in ("wait", "after")}
        print(f"round {r + 1}: send waited before recv {got['wait']:.0f} us p50, "
              f"after the reply {got['after']:.0f} us p50", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
