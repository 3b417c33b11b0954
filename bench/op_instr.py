"""Instructions per small op, counted by valgrind: a noise-free A/B of the engine's per-op path.

    python bench/op_instr.py --tree base=/tmp/base/src --tree new=src
    python bench/op_instr.py --tree new=src --op write,imm,sendrecv --transport tcp,tcp-plain
    python bench/op_instr.py --calls --top 15 --tree base=/tmp/base/src --tree new=src

Each point runs a child process (two engines in it, every thread) under valgrind's callgrind
twice, once with ``--ops`` ops and once with none, and divides the difference of the
instructions executed (user space, all threads) by ``--ops``: the startup, the imports and the
warm-up cancel out. The ops: ``write`` (4 KiB writes into the other engine's region, 64 in
flight, as ``tensorfabric bench``'s write points), ``write1`` (one 4 KiB write at a time, each
waited for: the latency of ``bench/peers_mooncake.py``; over ``--transport shm`` the copy
goes through the other engine's shared memory and its notice over tcp), ``imm`` (an immediate's round trip: barrier
and wait) and ``sendrecv`` (a 64 B message echoed by the other engine's thread).

CPU time per op on a shared 2-core VM moves by 15% from run to run (``bench/op_cpu.py``); the
instruction count of the same code moves by 1-2%, so a per-op trim shows here first. Valgrind
runs the threads one at a time (as one core would), which changes how replies batch against a
real run: this counts the Python each op costs, it does not time it. ``tensorfabric bench``
gives the speed (ratios to raw sockets), on an idle machine. Needs ``valgrind`` (Debian:
``apt install valgrind``); a point takes about a minute.

``--calls`` counts function calls per op instead (Python functions and C functions, by
thread), with a profile hook on every thread and no valgrind: seconds a point, and it names
where the calls are (``--top N``), which is where a per-op trim starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import collections, json, os, sys, threading
import numpy as np
import tensorfabric as tf

op, transport, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
COUNT = os.environ.get("TF_OP_CALLS") == "1"  # --calls: count calls instead of instructions
counts, counting = collections.Counter(), [False]
if COUNT:
    def prof(frame, event, arg):
        if counting[0]:
            name = threading.current_thread().name
            if event == "call":
                co = frame.f_code
                where = co.co_filename.rsplit("/tensorfabric/", 1)[-1].rsplit("/", 1)[-1]
                counts[(name, "py", f"{where}:{co.co_name}")] += 1
            elif event == "c_call":
                counts[(name, "c", getattr(arg, "__qualname__", "?"))] += 1
    threading.setprofile(prof)
    sys.setprofile(prof)
kw = dict(secret="op-instr", transports=("shm", "tcp") if transport == "shm" else ("tcp",),
          integrity=transport != "tcp-plain")
with tf.Engine(**kw) as a, tf.Engine(**kw) as b:
    def region(n):  # shm: memory the writer maps (an engine's alloc), else registered memory
        if transport == "shm":
            return b.alloc(n, access=tf.Access.READ_WRITE)
        return b.register(np.zeros(n, np.uint8), access=tf.Access.READ_WRITE)

    if op == "write":
        r = region(64 * 4096)
        d, src = r.descriptor(), np.ones(4096, np.uint8)

        def run(k):
            pending = []
            for i in range(k):
                pending.append(a.write(src, d, dst_offset=(i % 64) * 4096))
                if len(pending) >= 64:
                    pending.pop(0).wait(300)
            for t in pending:
                t.wait(300)
    elif op == "write1":
        r = region(4096)
        d, src = r.descriptor(), np.ones(4096, np.uint8)

        def run(k):
            for _ in range(k):
                a.write(src, d).wait(300)
    elif op == "imm":
        def run(k):
            for _ in range(k):
                w = b.expect(7, 1, timeout=300)
                a.barrier([b.address], 7).wait(300)
                w.wait(300)
    else:
        data = bytes(64)

        def run(k):
            def echo():
                for _ in range(k):
                    m = b.recv(tag=1, timeout=300)
                    b.send(m.peer, m.data, tag=1).wait(300)
            th = threading.Thread(target=echo)
            th.start()
            for _ in range(k):
                a.send(b.address, data, tag=1).wait(300)
                a.recv(tag=1, timeout=300)
            th.join()
    run(200)  # links up, caches warm
    counting[0] = COUNT
    run(n)
    counting[0] = False
if COUNT:
    print(json.dumps([[*k, v] for k, v in counts.items()]))
"""


def instructions(src: str, op: str, transport: str, n: int) -> int:
    """Instructions (all threads) of the child doing ``n`` ops after its warm-up."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    try:
        env = dict(os.environ, PYTHONPATH=src)
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             os.path.realpath(sys.executable), f.name, op, transport, str(n)],
            env=env, capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or m is None:
        raise SystemExit(f"valgrind run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return int(m.group(1))


def per_op(src: str, op: str, transport: str, n: int) -> float:
    return (instructions(src, op, transport, n) - instructions(src, op, transport, 0)) / n


def calls(src: str, op: str, transport: str, n: int) -> dict[tuple[str, str, str], float]:
    """Function calls per op, by (thread, "py" or "c", function), without valgrind: the
    child's ``n`` ops under a profile hook on every thread (deterministic up to how replies
    batch, a few per cent; a Python call costs about 1-2 thousand instructions)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    try:
        env = dict(os.environ, PYTHONPATH=src, TF_OP_CALLS="1")
        out = subprocess.run([sys.executable, f.name, op, transport, str(n)], env=env,
                             capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    if out.returncode:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    return {(_thread(th), kind, fn): c / n for th, kind, fn, c in rows}


def _thread(name: str) -> str:
    """A thread's role: the engines' threads by name (tf-dial0-rx, ...), others as one."""
    return name if name.startswith("tf-") or name == "MainThread" else "other"


def show_calls(trees: list[tuple[str, str]], ops: list[str], transports: list[str], n: int,
               top: int) -> None:
    for o in ops:
        for t in transports:
            tables = [calls(src, o, t, n) for _, src in trees]
            print(f"\n{o} over {t}: calls per op (Python functions / all, by thread)")
            threads = sorted({k[0] for tab in tables for k in tab})
            print(f"  {'thread':14} " + " ".join(f"{name:>16}" for name, _ in trees))
            for th in threads + ["all"]:
                cells = []
                for tab in tables:
                    py = sum(v for k, v in tab.items() if k[1] == "py" and th in (k[0], "all"))
                    every = sum(v for k, v in tab.items() if th in (k[0], "all"))
                    cells.append(f"{py:7.1f} / {every:6.1f}")
                print(f"  {th:14} " + " ".join(f"{c:>16}" for c in cells))
            if top:
                last = tables[-1]
                print(f"  top Python functions ({trees[-1][0]}):")
                pys = sorted(((v, k) for k, v in last.items() if k[1] == "py"), reverse=True)
                for v, (th, _, fn) in pys[:top]:
                    print(f"    {v:6.2f}  {th:14} {fn}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True,
                    help="NAME=SRC: a source tree to import tensorfabric from (repeat for A/B)")
    ap.add_argument("--op", default="write",
                    help="write, write1, imm, sendrecv (comma-separated)")
    ap.add_argument("--transport", default="tcp-plain,tcp",
                    help="tcp (frame MACs), tcp-plain and/or shm (comma-separated)")
    ap.add_argument("--ops", type=int, default=2000, help="ops per point (after 200 warm-up)")
    ap.add_argument("--calls", action="store_true",
                    help="count function calls per op by thread (no valgrind; seconds a point)")
    ap.add_argument("--top", type=int, default=0,
                    help="with --calls: list the N most-called Python functions")
    args = ap.parse_args(argv)
    if not args.calls and shutil.which("valgrind") is None:
        ap.error("valgrind is not installed (Debian: apt install valgrind)")
    trees = []
    for spec in args.tree:
        name, sep, src = spec.partition("=")
        if not sep or not os.path.isdir(os.path.join(src, "tensorfabric")):
            ap.error(f"--tree {spec!r}: expected NAME=SRC with SRC/tensorfabric in it")
        trees.append((name, os.path.abspath(src)))
    ops = [o for o in args.op.split(",") if o]
    transports = [t for t in args.transport.split(",") if t]
    for o in ops:
        if o not in ("write", "write1", "imm", "sendrecv"):
            ap.error(f"--op {o!r}: expected write, write1, imm or sendrecv")
    for t in transports:
        if t not in ("tcp", "tcp-plain", "shm"):
            ap.error(f"--transport {t!r}: expected tcp, tcp-plain or shm")
    if args.ops <= 0:
        ap.error("--ops must be positive")
    if args.top < 0:
        ap.error("--top must be >= 0")
    if args.calls:
        show_calls(trees, ops, transports, args.ops, args.top)
        return 0
    print(f"{'op':9} {'transport':10} " + " ".join(f"{n:>12}" for n, _ in trees)
          + ("   ratio (last/first)" if len(trees) > 1 else ""), flush=True)
    for o in ops:
        for t in transports:
            counts = [per_op(src, o, t, args.ops) for _, src in trees]
            line = f"{o:9} {t:10} " + " ".join(f"{c:12,.0f}" for c in counts)
            if len(counts) > 1:
                line += f"   {counts[-1] / counts[0]:.3f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
