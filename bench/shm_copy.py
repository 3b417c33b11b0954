#!/usr/bin/env python
"""The shm transport's segment copy: the numpy path against the compiled loop, in alternation
in one process (both copy the same pages into the same memfd mapping)::

    PYTHONPATH=src python bench/shm_copy.py
    PYTHONPATH=src python bench/shm_copy.py --pages 512,64 --page-size 16k --iters 500

Each point times what ``ShmTransport._copy`` runs for one write's segments: ``by_source``
(the order, and whether the copy may go to threads) and ``copy_segments``. Patterns:
``scattered`` (pages picked from a pool twice their number into a contiguous destination:
an MoE combine's answers) and ``src-run`` (a contiguous source into shuffled destination
pages: a KV handoff into a page table). Prints medians and compiled/numpy.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

import numpy as np

from tensorfabric import _compiled
from tensorfabric.transports import _copy


def _size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
    return int(text.rstrip("kKmM")) * mult


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", default="512,64,2048", help="comma list of page counts")
    ap.add_argument("--page-size", default="4k")
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    native = _compiled.native
    if native is None:
        raise SystemExit("tensorfabric._native is not built: nothing to compare")
    page = _size(args.page_size)
    counts = [int(n) for n in args.pages.split(",")]
    room = 4 * max(counts) * page
    fd = os.memfd_create("tf-bench-copy")
    os.ftruncate(fd, room)
    dst = np.frombuffer(mmap.mmap(fd, room), np.uint8)
    rng = np.random.default_rng(0)
    print(f"{'pages':>6} {'pattern':>10} {'numpy us':>9} {'compiled us':>12} {'ratio':>6}")
    try:
        for n in counts:
            for pattern in ("scattered", "src-run"):
                src = rng.integers(0, 256, 2 * n * page, dtype=np.uint8)
                if pattern == "scattered":
                    so = np.sort(rng.choice(2 * n, n, replace=False)).astype(np.int64) * page
                    do = np.arange(n, dtype=np.int64) * page
                else:
                    so = np.arange(n, dtype=np.int64) * page
                    do = rng.permutation(n).astype(np.int64) * page
                ln = np.full(n, page, np.int64)
                took: dict[str, list[float]] = {"numpy": [], "compiled": []}
                for _ in range(args.iters):
                    for name in took:
                        _compiled.native = native if name == "compiled" else None
                        t0 = time.perf_counter()
                        s, d, lengths, _runs = _copy.by_source(so, do, ln)
                        _copy.copy_segments(dst, src, s, d, lengths, presorted=True)
                        took[name].append(time.perf_counter() - t0)
                a, b = (float(np.median(took[k])) * 1e6 for k in ("numpy", "compiled"))
                print(f"{n:>6} {pattern:>10} {a:>9.0f} {b:>12.0f} {b / a:>6.2f}")
    finally:
        _compiled.native = native
        os.close(fd)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
