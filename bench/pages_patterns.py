"""Paged shm writes by page pattern, against one write of the same bytes, in the same run.

``tensorfabric bench`` times pages that are a permutation of the whole source. A paged write
can also move a contiguous buffer into scattered slots of a page pool (a KV sender), gather
pool slots into a contiguous range, or move pool slots to pool slots; the shm transport copies
the first three with one numpy call per run of pages and the last with a loop per page. This
program measures each pattern: 1024 pages (16 KiB by default) from this process into a peer
engine's region in a second process, paged write and one write of the same bytes alternated,
the median of the per-pair ratios (one write's time / the paged write's time).

    python bench/pages_patterns.py
    python bench/pages_patterns.py --page-kb 4 --pairs 60
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import tensorfabric as tf  # noqa: E402
from tensorfabric.bench._baselines import child_env  # noqa: E402

SECRET = "pages-patterns"
PEER = r"""
import sys, tensorfabric as tf
e = tf.Engine(secret=sys.argv[1])
r = e.alloc(int(sys.argv[2]), access=tf.Access.READ_WRITE)
print(e.address.hex(), r.descriptor().to_bytes().hex(), flush=True)
sys.stdin.readline()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--page-kb", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=40, help="alternated paged/single pairs per pattern")
    ap.add_argument("--transport", default="shm", choices=["shm", "tcp"])
    args = ap.parse_args()
    n, page = args.pages, args.page_kb << 10
    pool = 4 * n  # pool patterns draw from 4x as many slots as pages moved
    transports = ["shm", "tcp"] if args.transport == "shm" else ["tcp"]
    peer = subprocess.Popen([sys.executable, "-c", PEER, SECRET, str(pool * page)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=child_env())
    assert peer.stdin is not None and peer.stdout is not None
    try:
        _addr, desc_hex = peer.stdout.readline().split()
        desc = tf.RegionDescriptor.from_bytes(bytes.fromhex(desc_hex))
        rng = np.random.default_rng(0)
        patterns = {
            "permutation of the source (tensorfabric bench)": (rng.permutation(n), rng.permutation(n)),
            "contiguous source -> pool slots": (np.arange(n), rng.choice(pool, n, replace=False)),
            "pool slots -> contiguous destination": (rng.choice(pool, n, replace=False), np.arange(n)),
            "pool slots -> pool slots": (rng.choice(pool, n, replace=False), rng.choice(pool, n, replace=False)),
        }
        with tf.Engine(secret=SECRET, transports=transports) as eng:
            # registered process memory, as tensorfabric bench uses (a torch tensor's, say)
            src = eng.register(rng.integers(0, 256, pool * page, dtype=np.uint8))

            def single() -> None:
                eng.write(src, desc, nbytes=n * page).wait(30)

            print(f"# {n} pages of {args.page_kb} KiB over {args.transport}, {args.pairs} pairs; "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
            print("| pages | paged write / one write (throughput) | range (10th-90th pct) |")
            print("|---|---|---|")
            for name, (sp, dp) in patterns.items():
                def paged(sp: np.ndarray = sp, dp: np.ndarray = dp) -> None:
                    eng.write_pages(src, desc, src_pages=sp, dst_pages=dp, page_size=page).wait(30)

                for _ in range(5):  # warm: mappings, page faults
                    paged()
                    single()
                ratios = []
                for _ in range(args.pairs):
                    t0 = time.perf_counter()
                    paged()
                    t1 = time.perf_counter()
                    single()
                    t2 = time.perf_counter()
                    ratios.append((t2 - t1) / (t1 - t0))
                q = statistics.quantiles(ratios, n=10)
                print(f"| {name} | {statistics.median(ratios):.2f} | {q[0]:.2f}-{q[-1]:.2f} |", flush=True)
    finally:
        peer.stdin.write("\n")
        peer.stdin.flush()
        peer.wait(timeout=30)


if __name__ == "__main__":
    main()
