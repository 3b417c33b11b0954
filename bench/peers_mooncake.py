#!/usr/bin/env python
"""tensorfabric against Mooncake Transfer Engine (tcp protocol), same sizes, same run.

Three writers in alternation for every size, each into a pre-faulted buffer of another
process on this host: a raw Python socket (the baseline), a tensorfabric engine over tcp
(one link, frame MACs on; ``--transport tcp-plain``: none, as Mooncake's tcp sends none), and
Mooncake's TransferEngine with protocol "tcp" (``transfer_sync_write``).
Needs ``pip install mooncake-transfer-engine-non-cuda==0.3.13.post1`` and, from Debian,
``apt-get install libibverbs1 ibverbs-providers`` (the library links libibverbs even for
tcp)::

    PYTHONPATH=src python bench/peers_mooncake.py
    PYTHONPATH=src python bench/peers_mooncake.py --sizes 4k,1m,64m --budget 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from tensorfabric.bench import RawSocketPeer, parse_size
from tensorfabric.bench._engine import engine_from_options
from tensorfabric.bench._runner import BenchConfig, PeerProcess, Session
from tensorfabric.bench._stats import human_size


def serve(nbytes: int) -> None:
    """Mooncake target: register a buffer, print "session ptr", wait for stdin to close."""
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    if eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        sys.exit("mooncake: initialize failed")
    buf = np.ones(nbytes, dtype=np.uint8)
    if eng.register_memory(buf.ctypes.data, nbytes) != 0:
        sys.exit("mooncake: register_memory failed")
    print(f"127.0.0.1:{eng.get_rpc_port()} {buf.ctypes.data}", flush=True)
    sys.stdin.read()


class Mooncake:
    def __init__(self, nbytes: int) -> None:
        from mooncake.engine import TransferEngine

        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(nbytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError(f"mooncake target failed to start (exit {self.proc.wait()})")
        self.session, self.remote = line[0], int(line[1])
        self.eng = TransferEngine()
        if self.eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("mooncake: initialize failed")
        self.buf = np.ones(nbytes, dtype=np.uint8)
        self.eng.register_memory(self.buf.ctypes.data, nbytes)

    def write(self, size: int) -> None:
        rc = self.eng.transfer_sync_write(self.session, self.buf.ctypes.data, self.remote, size)
        if rc != 0:
            raise RuntimeError(f"mooncake transfer_sync_write returned {rc}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="4k,64k,1m,16m,64m,256m")
    p.add_argument("--budget", type=float, default=1.0, help="seconds per size")
    p.add_argument("--transport", default="tcp", choices=["tcp", "tcp-plain"],
                   help="tensorfabric's link: tcp (frame MACs, the default) or tcp-plain "
                        "(none, as Mooncake's tcp)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    cap = max(sizes)
    try:
        mc = Mooncake(cap)
    except ImportError as exc:
        sys.exit(f"Mooncake is not installed ({exc}): pip install "
                 "mooncake-transfer-engine-non-cuda==0.3.13.post1 and apt-get install "
                 "libibverbs1 ibverbs-providers")
    cfg = BenchConfig()
    peer = PeerProcess(args.transport, cfg)
    eng = engine_from_options(transport=args.transport)
    s = Session(eng, peer.address, cfg, args.transport)
    _rid, desc = s.remote_region(cap)
    src = eng.register(np.ones(cap, dtype=np.uint8))
    raw = RawSocketPeer(bufsize=cap, chunk=eng._tcp.chunk_bytes)
    fns = {"raw": lambda n: raw.write(n),
           "tensorfabric": lambda n: eng.write(src, desc, nbytes=n).wait(60),
           "mooncake": mc.write}
    rows = []
    print(f"{'size':>8} {'raw GB/s':>9} {'tf GB/s':>8} {'mooncake':>9} {'tf/mooncake':>11} "
          f"{'tf/raw':>7} {'mc/raw':>7}  p50 us tf / mooncake")
    try:
        for size in sizes:
            times: dict[str, list[float]] = {k: [] for k in fns}
            for f in fns.values():
                f(size)  # warm-up
            start = time.perf_counter()
            while time.perf_counter() - start < args.budget or len(times["raw"]) < 3:
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f(size)
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            gb = {k: size / v / 1e9 for k, v in med.items()}
            row = {"size": size, **{f"{k}_GBps": v for k, v in gb.items()},
                   **{f"{k}_p50_us": v * 1e6 for k, v in med.items()},
                   "tf_over_mooncake": gb["tensorfabric"] / gb["mooncake"],
                   "tf_over_raw": gb["tensorfabric"] / gb["raw"],
                   "mooncake_over_raw": gb["mooncake"] / gb["raw"]}
            rows.append(row)
            print(f"{human_size(size):>8} {gb['raw']:>9.2f} {gb['tensorfabric']:>8.2f} "
                  f"{gb['mooncake']:>9.2f} {row['tf_over_mooncake']:>11.2f} "
                  f"{row['tf_over_raw']:>7.2f} {row['mooncake_over_raw']:>7.2f}  "
                  f"{med['tensorfabric'] * 1e6:,.0f} / {med['mooncake'] * 1e6:,.0f}", flush=True)
    finally:
        raw.close()
        s.ctrl("quit")
        peer.close()
        eng.close()
        mc.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "argv": sys.argv, "transport": args.transport, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
